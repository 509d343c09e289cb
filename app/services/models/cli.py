"""`peregrine pull`, `ls`, `rm` and `search`: the model manager in a terminal.

Each function takes argv and returns an exit code; app/cli.py turns a
PeregrineError into one stderr line. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from app.services.models.downloads import Downloader, format_bytes
from app.services.models.fit import downloads_dir, library_for, models_dir, planner_wiring
from app.services.models.hub import HubService, QuantOption, RepoListing
from app.services.models.library import Library, ModelEntry
from app.services.settings import Settings, SettingsError, SettingsStore
from engine.errors import PeregrineError, UsageError
from engine.paths import Paths

log = logging.getLogger(__name__)


# C0 and C1 control characters (ESC, CR, newline ...): a hostile file or repo name must not
# drive the terminal or break one-entry-per-line output.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_SEARCH_LIMIT = 1000


def _shown(text: str) -> str:
    """Text safe to print in any locale and on any terminal.

    A file name that is not UTF-8 arrives as lone surrogates, which a strict UTF-8
    stdout cannot encode (they become U+FFFD); control characters become "?".
    """
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _CONTROL.sub("?", text)


def _out(line: str) -> None:
    sys.stdout.write(_shown(line) + "\n")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see `peregrine {self.prog.split()[-1]} --help`)")


class TerminalProgress:
    """A one-line progress bar on a stream, redrawn at most every `interval` seconds."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self._clock = clock
        self._tty = self.stream.isatty()
        # Without a terminal, redraws become lines: keep them rare.
        self._interval = interval if self._tty else 2.0
        self._last = -1e9
        self._start = clock()
        self._start_done: int | None = None
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        now = self._clock()
        if self._start_done is None:
            self._start_done = done  # resumed bytes don't count toward the speed
        if now - self._last < self._interval and done < total:
            return
        self._last = now
        elapsed = now - self._start
        speed = (done - self._start_done) / elapsed if elapsed > 0 else 0.0
        frac = done / total if total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = f" ETA {int((total - done) / speed)}s" if speed > 0 and done < total else ""
        line = (
            f"{_shown(self.label)} [{bar}] {frac * 100:5.1f}% {format_bytes(done)}/{format_bytes(total)}"
            f" {format_bytes(speed)}/s{eta}"
        )
        if self._tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _hub(with_fit: bool) -> HubService:
    # A token saved in the app's settings; else huggingface-hub finds HF_TOKEN or the login.
    token = _settings(Paths.from_env()).token
    if not with_fit:
        return HubService(token=token)
    fit, pick, reader = planner_wiring()
    return HubService(token=token, fit=fit, pick=pick, header_reader=reader)


def _settings(paths: Paths) -> Settings:
    """The app's settings, or defaults (logged) when the file is missing or unusable."""
    mode: int | None
    try:
        # read_bytes() on a FIFO or device would wait forever: only a regular file is read.
        mode = paths.settings_file.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        log.warning(
            "cannot read settings %s (%s); using the default settings", paths.settings_file, exc
        )
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        log.warning(
            "settings %s is not a regular file; using the default settings", paths.settings_file
        )
    elif mode is not None:
        try:
            return SettingsStore(paths.settings_file).load()
        except SettingsError as exc:
            log.warning("%s; using the default settings", exc)
    return Settings()


def _library(paths: Paths) -> Library:
    return library_for(paths, _settings(paths))


# --- pull ----------------------------------------------------------------------------------


def _describe_option(opt: QuantOption) -> str:
    parts = f" ({len(opt.files)} parts)" if opt.is_split else ""
    fit = f"  [{opt.fit.level}] {opt.fit.summary}" if opt.fit is not None else ""
    pick = "  <- recommended" if opt.picked else ""
    err = f"  (no fit badge: {opt.header_error})" if opt.header_error else ""
    return (
        f"{(opt.quant or '?'):<8} {format_bytes(opt.size):>10}  {opt.name}{parts}{fit}{pick}{err}"
    )


def _choose(listing: RepoListing, file: str | None, quant: str | None) -> QuantOption:
    wanted = file or quant
    if wanted:
        opt = listing.find(wanted)
        if opt is None:
            what = "file" if file else "quant"
            have = ", ".join(o.quant or o.name for o in listing.options) or "none"
            raise PeregrineError(f"{listing.repo_id} has no {what} {wanted} (GGUF quants: {have})")
        return opt
    if not listing.options:
        if listing.refused:
            bad = listing.refused[0]
            raise PeregrineError(
                f"{listing.repo_id} lists no GGUF file Peregrine can accept "
                f"(refused {bad.path!r}: {bad.reason})"
            )
        raise PeregrineError(f"{listing.repo_id} has no GGUF files")
    if len(listing.options) == 1:
        return listing.options[0]
    picked = [o for o in listing.options if o.picked]
    if picked:
        return picked[0]
    have = ", ".join(o.quant or o.name for o in listing.options)
    raise UsageError(
        f"{listing.repo_id} has several quants ({have}): choose one with --quant or a file name"
    )


def pull_main(argv: list[str]) -> int:
    """Downloads a GGUF model (all parts of a split one), resumably and SHA-256 verified."""
    p = _Parser(prog="peregrine pull", description="Download a GGUF model from Hugging Face.")
    p.add_argument("repo", help="owner/name on Hugging Face")
    p.add_argument("file", nargs="?", help="a .gguf file in the repo (or a quant label)")
    p.add_argument("--quant", help="pick the file by quant, e.g. Q4_K_M")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--list", action="store_true", help="list the repo's quants with fit badges")
    args = p.parse_args(argv)
    for what, value in (
        ("the file", args.file),
        ("--quant", args.quant),
        ("--revision", args.revision),
    ):
        if value is not None and not value.strip():
            raise UsageError(f"{what} cannot be empty")
    if args.file and args.quant:
        raise UsageError("give a file or --quant, not both")
    paths = Paths.from_env().ensure()
    needs_fit = args.list or not (args.file or args.quant)
    hub = _hub(with_fit=needs_fit)
    listing = hub.list_quants(args.repo, args.revision, with_fit=needs_fit)
    if args.list:
        for opt in listing.options:
            _out(_describe_option(opt))
        return 0
    opt = _choose(listing, args.file, args.quant)
    if not opt.complete:
        raise PeregrineError(f"{opt.name}: the repo does not have every part of this split model")
    bar = TerminalProgress(opt.name)

    def notice(message: str) -> None:
        sys.stderr.write(f"peregrine pull: {message}\n")

    settings = _settings(paths)
    downloader = Downloader(
        paths,
        endpoint=hub.endpoint,
        token=hub.token,
        models_dir=models_dir(paths, settings),
        downloads_dir=downloads_dir(paths, settings),
    )
    try:
        finals = downloader.download_model(
            args.repo,
            [f.path for f in opt.files],
            listing.commit or args.revision,
            on_progress=bar.update,
            on_notice=notice,
        )
    finally:
        bar.finish()
    for path in finals:
        _out(str(path))
    return 0


# --- ls, rm, search --------------------------------------------------------------------------


def _entry_json(e: ModelEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "path": str(e.path),
        "source": e.source,
        "read_only": e.read_only,
        "size": e.size,
        "architecture": e.architecture,
        "n_params": e.n_params,
        "quant": e.quant,
        "context_length": e.context_length,
        "license": e.license,
        "has_chat_template": e.has_chat_template,
        "mtp_layers": e.mtp_layers,
        "error": e.error,
    }


def _params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def ls_main(argv: list[str]) -> int:
    """Lists Peregrine's models and, read-only, other apps' GGUFs."""
    p = _Parser(prog="peregrine ls", description="List the models Peregrine can run.")
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    p.add_argument("--own", action="store_true", help="only the models you downloaded or imported")
    args = p.parse_args(argv)
    paths = Paths.from_env()
    if args.own:
        # The models you downloaded or imported: what `rm` can delete.
        library = library_for(paths, _settings(paths), builtin=None)
        library.scan_folders = []
    else:
        library = _library(paths)
    entries = library.entries()
    if args.json:
        sys.stdout.write(json.dumps([_entry_json(e) for e in entries], indent=1) + "\n")
        return 0
    if not entries:
        sys.stdout.write("no models yet: try `peregrine search TERM` and `peregrine pull REPO`\n")
        return 0
    for e in entries:
        if e.error:
            detail = f"invalid: {e.error}"
        else:
            detail = (
                f"{e.architecture or '?'} {_params(e.n_params)} {e.quant or '?'} "
                f"ctx {e.context_length or '?'}"
            )
        ro = " (read-only)" if e.read_only else ""
        _out(f"{e.id}  {format_bytes(e.size)}  {detail}  [{e.source}{ro}]")
    return 0


def rm_main(argv: list[str]) -> int:
    """Deletes one of Peregrine's models; other apps' files are refused."""
    p = _Parser(prog="peregrine rm", description="Delete a downloaded model.")
    p.add_argument("model", help="an id or file name from `peregrine ls`")
    args = p.parse_args(argv)
    library = _library(Paths.from_env())
    entry = library.find(args.model)
    for path in library.delete(entry):
        _out(f"deleted {path}")
    return 0


def search_main(argv: list[str]) -> int:
    """Searches Hugging Face for GGUF repos."""
    p = _Parser(prog="peregrine search", description="Search Hugging Face for GGUF models.")
    p.add_argument("term")
    p.add_argument("--limit", type=int, default=20)
    args = p.parse_args(argv)
    if not args.term.strip():
        raise UsageError("give a search term, e.g. `peregrine search llama`")
    if not 1 <= args.limit <= MAX_SEARCH_LIMIT:
        raise UsageError(f"--limit must be between 1 and {MAX_SEARCH_LIMIT}")
    results = _hub(with_fit=False).search(args.term, limit=args.limit)
    if not results:
        _out(f"no GGUF repos match {args.term!r}")
        return 0
    for r in results:
        flags = " gated" if r.gated else ""
        _out(
            f"{r.repo_id}  {r.downloads:,} downloads  {r.likes:,} likes  {r.license or '?'}{flags}"
        )
    return 0
