"""The `peregrine` command: one entry point, a subcommand per job.

Each subcommand lives in the module that owns the job and exposes
`main(argv) -> int`. Errors follow docs/api.md: one line on stderr, exit 1
(2 for bad usage), and a traceback only with `--debug`.
"""

from __future__ import annotations

import importlib
import logging
import sys
import unicodedata
from collections.abc import Callable, Sequence

from engine.child import CHILD_COMMAND, CHILD_MODULES
from engine.errors import PeregrineError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "gui": ("app.qt.main", "main", "open the desktop app (the default)"),
    "serve": ("engine.serving.serve_cli", "main", "run the engine: an OpenAI-compatible server"),
    "profile": ("engine.planning.profile_cli", "main", "detect hardware and plan a model's memory"),
    "pull": ("app.services.models.cli", "pull_main", "download a model from Hugging Face"),
    "ls": ("app.services.models.cli", "ls_main", "list the models Peregrine can run"),
    "rm": ("app.services.models.cli", "rm_main", "delete a downloaded model"),
    "search": ("app.services.models.cli", "search_main", "search Hugging Face for GGUF models"),
    "runtime": ("app.services.runtimes_cli", "main", "list, download or remove engine runtimes"),
}

USAGE = "usage: peregrine [--debug] [--version] [COMMAND] [ARGS...]\n\ncommands:\n" + "".join(
    f"  {name:<8} {help_}\n" for name, (_, _, help_) in COMMANDS.items()
)


def _load(name: str) -> Callable[[list[str]], int] | None:
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the command's own module being absent means "not built yet";
        # any other missing import is a real error and propagates.
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise
    func = getattr(module, func_name, None)
    return func if callable(func) else None


def _run_child(args: list[str]) -> int:
    """`peregrine _child MODULE ARGS`: a frozen bundle's `python -m MODULE ARGS` (engine.child)."""
    if not args or args[0] not in CHILD_MODULES:
        sys.stderr.write(f"peregrine {CHILD_COMMAND}: expected one of {', '.join(CHILD_MODULES)}\n")
        return 2
    module = importlib.import_module(args[0])
    return int(module.main(args[1:]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == CHILD_COMMAND:
        # Before any option handling: the arguments are the child module's own.
        return _run_child(args[1:])
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args and args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if args and args[0] in ("-V", "--version"):
        from app.services.build_info import build_info

        sys.stdout.write(build_info().version_line() + "\n")
        return 0
    name = args.pop(0) if args and not args[0].startswith("-") else "gui"
    if name not in COMMANDS:
        sys.stderr.write(f"peregrine: unknown command {name!r}\n{USAGE}")
        return 2
    try:
        func = _load(name)
        if func is None:
            sys.stderr.write(f"peregrine {name}: not available yet\n")
            return 2
        return int(func(args) or 0)
    except PeregrineError as exc:
        if debug:
            raise
        sys.stderr.write(f"peregrine {name}: error: {_one_line(str(exc))}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        sys.stderr.write(
            f"peregrine {name}: internal error: {_one_line(f'{type(exc).__name__}: {exc}')}"
            " (run with --debug for details)\n"
        )
        return 1


def _one_line(text: str) -> str:
    # Control characters (an ESC in a hostile file name) never reach the terminal.
    text = "".join(
        "?" if unicodedata.category(c) == "Cc" and c not in "\t\n\r" else c for c in text
    )
    return " ".join(text.split()) or "unknown error"


if __name__ == "__main__":
    raise SystemExit(main())
