"""How Peregrine runs one of its own modules in a child process, from source or frozen.

From a source install the child is `python -m MODULE`. A frozen bundle
(PyInstaller sets `sys.frozen`) has no interpreter that takes `-m`: its one
executable runs the module's `main(argv)` through the hidden `peregrine _child
MODULE` command instead (app/cli.py).
"""

from __future__ import annotations

import sys

CHILD_COMMAND = "_child"
# The program's entry module: a frozen executable *is* it, so it needs no `_child`.
ENTRY_MODULE = "app.cli"
# The modules started as children; each has `main(argv) -> int`.
CHILD_MODULES = (ENTRY_MODULE, "engine.planning.probe", "engine.planning.hardware")


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
        return [exe] if module == ENTRY_MODULE else [exe, CHILD_COMMAND, module]
    return [exe, "-m", module]
