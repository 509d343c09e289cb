"""Owns the download queue for the app: starts, pauses, resumes, cancels, and loads what finished.

The queue (app/services/models/downloads.py) runs transfers on its own worker
threads and reports plain `DownloadStatus` values, at most about ten a second
per download; they cross to the GUI thread through a queued signal. The queue
is kept in `downloads/queue.json`, so what was unfinished at quit (or at a
crash) resumes at the next start from the bytes on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal

from app.qt.engine_controller import EngineController
from app.qt.error_panel import ErrorReporter
from app.qt.models.downloads_tab import DownloadsTab
from app.qt.settings.controller import SettingsController
from app.services.models.downloads import Downloader, DownloadQueue, DownloadStatus, JobState
from app.services.models.fit import downloads_dir, models_dir
from app.services.models.queue_file import QueueFile
from app.services.settings import Settings
from engine.paths import Paths

log = logging.getLogger(__name__)

# (paths, settings) -> the Downloader for the next transfer; tests inject faults here.
DownloaderFactory = Callable[[Paths, Settings], Downloader]


def default_downloader(paths: Paths, settings: Settings) -> Downloader:
    """A downloader as the settings say now: token, models folder (HF_ENDPOINT at call time)."""
    return Downloader(
        paths,
        token=settings.token,
        models_dir=models_dir(paths, settings),
        downloads_dir=downloads_dir(paths, settings),
    )


class DownloadsController(QObject):
    """The queue, its tab, and what a finished download leads to (the library, Load)."""

    status_changed = Signal(object)  # DownloadStatus, on the GUI thread
    finished = Signal(object)  # DownloadStatus of a download that just completed
    _from_worker = Signal(object)

    def __init__(
        self,
        tab: DownloadsTab,
        paths: Paths,
        settings: SettingsController,
        engine: EngineController,
        errors: ErrorReporter,
        *,
        make_downloader: DownloaderFactory = default_downloader,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.tab = tab
        self._paths = paths
        self._settings = settings
        self.engine = engine
        self._errors = errors
        self._make = make_downloader
        self.statuses: dict[str, DownloadStatus] = {}
        # Emitted on a worker thread, delivered on the GUI thread.
        self._from_worker.connect(self._on_status, Qt.ConnectionType.QueuedConnection)
        self.queue = DownloadQueue(
            lambda: self._make(self._paths, self._settings.settings),
            workers=settings.settings.downloads_at_once,
            listener=self._from_worker.emit,
            journal=QueueFile(paths.downloads / "queue.json"),
        )
        settings.downloads_at_once_changed.connect(self.queue.set_limit)
        tab.pause_requested.connect(self.queue.pause)
        tab.resume_requested.connect(self.queue.resume)
        tab.cancel_requested.connect(self.queue.cancel)
        tab.load_requested.connect(self.load)
        tab.clear_requested.connect(self.clear)
        self._closed = False

    def add(self, repo_id: str, files: Sequence[str], revision: str | None = None) -> str:
        """Queues a model (every part of a split one); a second click on it returns the same job."""
        return self.queue.add(repo_id, list(files), revision)

    def load(self, job_id: str) -> None:
        st = self.statuses.get(job_id)
        if st is None or not st.paths:
            return
        path = st.paths[0]
        if not Path(path).exists():
            self._errors.show(f"{path.name} is no longer on disk; download it again.")
            return
        self.engine.load(path)

    def clear(self, job_id: str) -> None:
        self.queue.remove(job_id)
        self.statuses.pop(job_id, None)
        self.tab.remove(job_id)

    @property
    def active(self) -> int:
        final = (JobState.DONE, JobState.CANCELLED)
        return sum(s.state not in final for s in self.statuses.values())

    def _on_status(self, st: DownloadStatus) -> None:
        if self._closed:
            return
        before = self.statuses.get(st.job_id)
        self.statuses[st.job_id] = st
        self.tab.set_status(st)
        self.status_changed.emit(st)
        if st.state is JobState.DONE and (before is None or before.state is not JobState.DONE):
            self.finished.emit(st)

    def shutdown(self) -> None:
        """Stops the transfers, keeping partial files and the queue for the next start."""
        if self._closed:
            return
        self._closed = True
        self.queue.close(timeout=5.0)
