"""`peregrine runtime list|pull|rm`: engine runtime packs in a terminal (docs/api.md).

`list` shows the installed runtimes (with their self-test result) and the packs
the index offers for this computer, marking the one its hardware suggests;
`pull NAME` downloads, verifies, self-tests and installs a pack; `rm NAME`
deletes an installed runtime. A running engine keeps the libraries it loaded:
removing or replacing its runtime takes effect at its next start.
"""

from __future__ import annotations

from pathlib import Path

from app.services.models.cli import TerminalProgress, _out, _Parser
from app.services.models.downloads import format_bytes
from app.services.runtimes import load_snapshot, this_machine
from engine.errors import PeregrineError, UsageError
from engine.paths import Paths
from engine.runtime_packs import (
    Pack,
    RuntimePacks,
    fetch_index,
    index_url,
    unsuitable,
)

USAGE = "peregrine runtime {list,pull,rm} ..."


def main(argv: list[str]) -> int:
    p = _Parser(prog="peregrine runtime", description="Engine runtimes: list, download, remove.")
    sub = p.add_subparsers(dest="command", metavar="{list,pull,rm}")
    ls = sub.add_parser("list", help="installed runtimes and the packs available for this computer")
    ls.add_argument("--all", action="store_true", help="also packs for other hardware")
    pull = sub.add_parser("pull", help="download, verify, self-test and install a runtime pack")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="even if it does not suit this computer")
    rm = sub.add_parser("rm", help="delete an installed runtime")
    rm.add_argument("name")
    args = p.parse_args(argv)
    paths = Paths.from_env()
    if args.command == "list":
        return _list(paths, args.all)
    if args.command == "pull":
        return _pull(paths, args.name, args.force)
    if args.command == "rm":
        RuntimePacks(paths).remove(args.name)
        _out(f"removed runtime {args.name} (an engine running on it keeps it until its next start)")
        return 0
    raise UsageError(f"usage: {USAGE}")


def _list(paths: Paths, show_all: bool) -> int:
    snap = load_snapshot(paths)
    _out("installed:")
    if not snap.installed:
        _out("  none (the engine uses the llama.cpp built into Peregrine, on the CPU)")
    for r in snap.installed:
        state = r.problem or (f"self-test {r.self_test}" if r.self_test else "not self-tested yet")
        _out(f"  {r.name:<12} {r.backend or '?':<8} {state}")
    if snap.index_problem:
        _out(f"available: unknown ({snap.index_problem})")
        return 0
    _out(f"available ({index_url()}):")
    machine = this_machine(paths) if show_all and snap.others else None
    for pack in snap.available + (snap.others if show_all else []):
        why = unsuitable(pack, machine) if machine is not None else None
        mark = "  <- suggested" if pack.name == snap.suggested and not why else ""
        note = f"  (not for this computer: {why})" if why else ""
        _out(
            f"  {pack.name:<12} {pack.backend:<8} {format_bytes(pack.size):>10}  "
            f"{pack.platform}{note}{mark}"
        )
    if not snap.available and not show_all:
        _out("  none for this computer (--all lists every pack)")
    return 0


def _pull(paths: Paths, name: str, force: bool) -> int:
    available = fetch_index()
    found = [p for p in available if p.name == name]
    if not found:
        have = ", ".join(sorted({p.name for p in available})) or "none"
        raise PeregrineError(f"the runtime index has no pack {name!r} (packs: {have})")
    machine = this_machine(paths)
    fits = [p for p in found if unsuitable(p, machine) is None]
    pack: Pack = (fits or found)[0]
    why = unsuitable(pack, machine)
    if why is not None and not force:
        raise PeregrineError(f"the {name} runtime does not suit this computer: {why} (--force)")
    bar = TerminalProgress(f"runtime {name}")
    try:
        folder: Path = RuntimePacks(paths).install(pack, progress=bar.update)
    finally:
        bar.finish()
    _out(f"installed runtime {name} ({pack.backend}) in {folder}; self-test passed")
    _out("the engine can use it from its next start (peregrine serve --runtime " + name + ")")
    return 0
