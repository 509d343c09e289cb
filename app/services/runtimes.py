"""What the app and the CLI show about engine runtimes: installed ones and packs for this computer.

The work itself (index, download, unpack, self-test, remove) is engine.runtime_packs;
this module puts together one snapshot of it for a view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engine.paths import Paths
from engine.planning.hardware import HardwareProbes, detect_hardware
from engine.runtime_packs import (
    Installed,
    Machine,
    Pack,
    PackError,
    RuntimePacks,
    describe_machine,
    fetch_index,
    suggested,
    unsuitable,
)


def this_machine(paths: Paths) -> Machine:
    """This computer's GPUs, from the vendor probes only (no llama.cpp is loaded)."""
    hardware = detect_hardware(
        HardwareProbes(probe_ggml=False, runtimes_dir=paths.runtimes), models_dir=paths.models
    )
    return describe_machine(g.backend for g in hardware.gpus)


@dataclass(frozen=True)
class RuntimesSnapshot:
    """Installed runtimes, the packs that suit this computer, and the one it should use."""

    installed: list[Installed]
    available: list[Pack] = field(default_factory=list)  # those that suit this computer
    others: list[Pack] = field(default_factory=list)  # those that do not
    suggested: str | None = None
    index_problem: str | None = None  # why the index could not be read


def load_snapshot(
    paths: Paths,
    index: Callable[[], list[Pack]] = fetch_index,
    machine: Callable[[Paths], Machine] = this_machine,
) -> RuntimesSnapshot:
    """Reads the runtimes folder and the index; an unreadable index is reported, not raised."""
    installed = RuntimePacks(paths).installed()
    try:
        packs = index()
    except PackError as exc:
        return RuntimesSnapshot(installed, index_problem=str(exc))
    here = machine(paths)
    best = suggested(packs, here)
    return RuntimesSnapshot(
        installed,
        [p for p in packs if unsuitable(p, here) is None],
        [p for p in packs if unsuitable(p, here) is not None],
        best.name if best else None,
    )
