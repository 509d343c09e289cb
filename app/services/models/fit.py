"""The planner's fit badges for the model manager, and the library as settings configure it.

The planner lives in the engine (`engine.planning`); the hardware is detected
once, on first use, since probing the GPUs costs a child process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.services.models.hub import FitLike
from app.services.models.library import (
    Library,
    LocalFitFn,
    default_scan_folders,
    scan_folders_from_strings,
)
from app.services.settings import Settings
from engine.default_model import default_model_path
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.planning.hardware import Hardware, detect_hardware

log = logging.getLogger(__name__)


class HardwareSource:
    """The machine the app plans for: described by a hardware file, or this one.

    This machine is detected once, on first use (probing GPUs costs a child
    process), from whichever thread asks first; call `get` off the GUI thread.
    """

    def __init__(
        self,
        described: Hardware | None = None,
        *,
        file: str | None = None,
        detect: Callable[[], Hardware] = detect_hardware,
    ) -> None:
        self._hardware = described
        self.file = file  # the hardware file's name, for the wizard's label
        self._detect = detect
        self._lock = threading.Lock()

    @property
    def described(self) -> bool:
        """True when the machine comes from a hardware file (`peregrine gui --hardware`)."""
        return self.file is not None

    def get(self) -> Hardware:
        with self._lock:
            if self._hardware is None:
                self._hardware = self._detect()
            return self._hardware


def planner_wiring(
    source: HardwareSource | Hardware | None = None,
) -> tuple[Any, Any, Any]:
    """(fit, pick, remote header reader) from engine/, or Nones when those modules are absent.

    Fits are planned for `source` (default: this machine); a `Hardware` is a
    described machine.
    """
    try:
        from engine.gguf.header import read_remote_gguf_header
        from engine.planning import planner
    except ImportError as exc:
        log.info("fit badges unavailable: %s", exc)
        return None, None, None
    if isinstance(source, Hardware):
        source = HardwareSource(source, file="described")
    hw = (source or HardwareSource()).get

    def fit(name: str, header: Any, size: int) -> FitLike:
        return planner.fit_badge(hw(), planner.ModelCandidate(name, header, size))

    def pick(candidates: Sequence[tuple[str, Any, int]]) -> str | None:
        try:
            plan = planner.plan(hw(), [planner.ModelCandidate(n, h, s) for n, h, s in candidates])
        except PeregrineError as exc:
            # Nothing fits: no pick; every quant's badge already says why.
            log.info("no quant picked: %s", exc)
            return None
        return plan.quant_file

    def read_header(url: str, headers: dict[str, str]) -> Any:
        return read_remote_gguf_header(url, headers=headers)

    return fit, pick, read_header


def models_dir(paths: Paths, settings: Settings) -> Path:
    """Where Peregrine keeps its own models: the folder from settings, else models/."""
    return Path(settings.models_folder).expanduser() if settings.models_folder else paths.models


def library_for(
    paths: Paths,
    settings: Settings,
    *,
    fit: LocalFitFn | None = None,
    builtin: Callable[[], Path] | None = default_model_path,
) -> Library:
    """The library as the settings configure it: models folder, scan folders, built-in model."""
    configured = settings.library_scan_folders
    folders = (
        default_scan_folders() if configured is None else scan_folders_from_strings(configured)
    )
    return Library(paths, folders, models_dir=models_dir(paths, settings), builtin=builtin, fit=fit)


def downloads_dir(paths: Paths, settings: Settings) -> Path:
    """Partial downloads: beside a models folder from settings (one disk, atomic rename)."""
    return models_dir(paths, settings) / ".downloads" if settings.models_folder else paths.downloads
