"""How Peregrine runs one of its own modules in a child process, from source or frozen.

From a source install the child is `python -m MODULE`. A frozen bundle
(PyInstaller sets `sys.frozen`) has no interpreter that takes `-m`: its one
executable runs the module's `main(argv)` through the hidden `peregrine _child
MODULE` command instead (app/cli.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

CHILD_COMMAND = "_child"
# The program's entry module: a frozen executable *is* it, so it needs no `_child`.
ENTRY_MODULE = "app.cli"
# The modules started as children; each has `main(argv) -> int`.
CHILD_MODULES = (
    ENTRY_MODULE,
    "engine.planning.probe",
    "engine.planning.hardware",
    "engine.runtimes",
)


# Windows: no console window flashes up for a child (0 elsewhere, where it means nothing).
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


def is_frozen() -> bool:
    """True inside a bundle built by PyInstaller."""
    return bool(getattr(sys, "frozen", False))


def module_argv(module: str, python: str | None = None) -> list[str]:
    """The argv prefix that runs `module` in a new process; arguments follow it.

    `python` picks another interpreter (tests); a frozen bundle ignores only its
    own executable's path, which cannot take `-m`.
    """
    if module not in CHILD_MODULES:
        raise ValueError(f"{module} is not a child module")
    exe = sys.executable if python is None else python
    if is_frozen() and exe == sys.executable:
        console = _console_twin(Path(exe))
        return [console] if module == ENTRY_MODULE else [console, CHILD_COMMAND, module]
    return [exe, "-m", module]


def _console_twin(exe: Path) -> str:
    """On Windows the shortcuts start `peregrinew.exe` (no console); children, whose
    output is read through pipes, run as its console twin `peregrine.exe`."""
    twin = exe.with_name("peregrine.exe")
    if exe.name.lower() == "peregrinew.exe" and twin.is_file():
        return str(twin)
    return str(exe)


def crash_reason(returncode: int, stderr: str) -> str:
    """How a child killed by a signal (a negative return code) died, for one line:
    the signal's name, then the line that says why ("(SIGABRT): GGML_ASSERT(...)")."""
    try:
        why = signal.Signals(-returncode).name
    except ValueError:
        why = f"signal {-returncode}"
    last = crash_line(stderr)
    return f"({why}): {last}" if last else f"({why})"


def crash_line(stderr: str) -> str:
    """The line that says why a child aborted: llama.cpp's assert or C++'s terminate message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("GGML_ASSERT", "GGML_ABORT", "what():", "terminate called", "error"):
        for line in reversed(lines):
            if marker in line:
                return line[:300]
    return lines[-1][:300] if lines else ""
