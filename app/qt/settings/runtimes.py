"""Settings → Engine runtimes: installed runtimes, packs for this computer, download and remove.

`RuntimesController` owns the work: a snapshot read off the GUI thread
(app.services.runtimes), one pack download at a time on its own QThread
(engine.runtime_packs does the download, checks, unpacking and self-test),
removals as background calls. `RuntimesSection` draws the controller's state.
A new runtime is used from the next engine start; the running engine keeps
the libraries it loaded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.qt.workers import BackgroundCalls
from app.services.models.downloads import format_bytes
from app.services.runtimes import RuntimesSnapshot, load_snapshot
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.runtime_packs import Cancelled, Pack, RuntimePacks

log = logging.getLogger(__name__)

NEXT_START = "The engine uses it from its next start (Settings → Engine, or a model's load)."


class PackWorker(QObject):
    """Downloads and installs one pack; lives on its own thread."""

    done = Signal(str, str)  # name, folder
    failed = Signal(str, str)  # name, message
    finished = Signal(str)

    def __init__(self, packs: RuntimePacks, pack: Pack) -> None:
        super().__init__()
        self.pack = pack
        self._packs = packs
        self._cancel = threading.Event()
        # (bytes done, bytes total), read by the controller's timer: progress as data.
        self.latest = (0, pack.size)

    def cancel(self) -> None:
        """Safe from the GUI thread while run() blocks on the network."""
        self._cancel.set()

    def _progress(self, done: int, total: int) -> None:
        self.latest = (done, total)  # one assignment: safe to read from the GUI thread

    @Slot()
    def run(self) -> None:
        name = self.pack.name
        try:
            folder = self._packs.install(self.pack, self._progress, self._cancel.is_set)
            self.done.emit(name, str(folder))
        except Cancelled:
            self.failed.emit(name, f"The download of the {name} runtime was cancelled.")
        except PeregrineError as exc:
            self.failed.emit(name, str(exc))
        except Exception as exc:
            log.exception("installing runtime %s failed", name)
            self.failed.emit(name, f"installing the {name} runtime failed: {exc}")
        finally:
            self.finished.emit(name)


class RuntimesController(QObject):
    """The runtimes page's state, and the work behind its buttons."""

    changed = Signal()
    progress = Signal(str, int, int)

    def __init__(
        self,
        paths: Paths,
        background: BackgroundCalls,
        in_use: Callable[[], str | None] = lambda: None,
        snapshot: Callable[[Paths], RuntimesSnapshot] = load_snapshot,
        packs: Callable[[Paths], RuntimePacks] = RuntimePacks,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.paths = paths
        self._background = background
        self._in_use = in_use
        self.snapshot_fn = snapshot
        self._packs = packs
        self.snapshot: RuntimesSnapshot | None = None
        self.loading = False
        self.message = ""
        self.downloading: str | None = None
        self.done_bytes = (0, 0)
        self._worker: PackWorker | None = None
        self._thread: QThread | None = None
        self._alive: dict[QThread, PackWorker] = {}
        # Progress is drawn at most 10 times a second, from the worker's latest figures.
        self._ticker = QTimer(self)
        self._ticker.setInterval(100)
        self._ticker.timeout.connect(self._tick)

    @property
    def in_use(self) -> str | None:
        return self._in_use()

    def refresh(self) -> None:
        """Reads the runtimes folder and the index again, off the GUI thread."""
        if self.loading:
            return
        self.loading = True
        self.changed.emit()
        self._background.run(
            lambda: self.snapshot_fn(self.paths),
            self._on_snapshot,
            self._on_snapshot_failed,
            what="Reading the engine runtimes",
        )

    def _on_snapshot(self, snap: RuntimesSnapshot) -> None:
        self.loading = False
        self.snapshot = snap
        self.changed.emit()

    def _on_snapshot_failed(self, message: str) -> None:
        self.loading = False
        self.message = f"The engine runtimes could not be read: {message}"
        self.changed.emit()

    def download(self, name: str) -> None:
        """Starts downloading and installing the pack `name` (one at a time)."""
        if self._worker is not None or self.snapshot is None:
            return
        pack = next((p for p in self.snapshot.available if p.name == name), None)
        if pack is None:
            return
        worker = PackWorker(self._packs(self.paths), pack)
        thread = QThread()
        thread.setObjectName(f"runtime-{name}")
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.done.connect(self._on_done)
        worker.failed.connect(self._on_failed)
        worker.finished.connect(thread.quit)
        worker.finished.connect(self._on_finished)
        thread.finished.connect(self._on_thread_finished)
        self._alive[thread] = worker
        self._worker, self._thread = worker, thread
        self.downloading = name
        self.done_bytes = (0, pack.size)
        self.message = f"Downloading the {name} runtime…"
        self.changed.emit()
        thread.start()
        self._ticker.start()

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def remove(self, name: str) -> None:
        def removed(_result: object) -> None:
            self.message = f"Removed the {name} runtime." + (
                " The running engine keeps it until its next start." if name == self.in_use else ""
            )
            self.refresh()

        def failed(message: str) -> None:
            self.message = message
            self.changed.emit()

        self._background.run(
            lambda: self._packs(self.paths).remove(name), removed, failed, what="Removing"
        )

    def shutdown(self, wait_ms: int = 3000) -> None:
        """Cancels a download and joins its thread; used when the app quits."""
        self.cancel()
        for thread in list(self._alive):
            thread.quit()
            thread.wait(wait_ms)

    @Slot()
    def _tick(self) -> None:
        worker = self._worker
        if worker is None or worker.latest == self.done_bytes:
            return
        self.done_bytes = done, total = worker.latest
        name = worker.pack.name
        if done >= total:
            self.message = f"Checking and self-testing the {name} runtime…"
            self.changed.emit()
        self.progress.emit(name, done, total)

    @Slot(str, str)
    def _on_done(self, name: str, folder: str) -> None:
        self.message = f"Installed the {name} runtime; its self-test passed. {NEXT_START}"

    @Slot(str, str)
    def _on_failed(self, name: str, message: str) -> None:
        self.message = message

    @Slot(str)
    def _on_finished(self, _name: str) -> None:
        self._tick()  # the last figures, however soon the work ended
        self._ticker.stop()
        self._worker, self._thread = None, None
        self.downloading = None
        self.changed.emit()
        self.refresh()

    @Slot()
    def _on_thread_finished(self) -> None:
        thread = self.sender()
        QTimer.singleShot(0, lambda: self._alive.pop(thread, None))  # type: ignore[call-overload]


class RuntimesSection(QFrame):
    """Draws the runtimes: installed (self-test, backend, in use) and downloadable packs."""

    def __init__(self, controller: RuntimesController, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.setObjectName("card")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(18, 14, 18, 16)
        lay.setSpacing(10)
        heading = QLabel("Engine runtimes")
        heading.setObjectName("sectionTitle")
        lay.addWidget(heading)
        hint = QLabel(
            "A runtime is a llama.cpp build for your hardware. GPU runtimes are downloaded "
            "here, checked against their SHA-256 and self-tested before they are used."
        )
        hint.setObjectName("hint")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        self.grid = QGridLayout()
        self.grid.setHorizontalSpacing(16)
        self.grid.setVerticalSpacing(8)
        lay.addLayout(self.grid)
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setVisible(False)
        lay.addWidget(self.progress)
        self.status = QLabel()
        self.status.setObjectName("hint")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        bottom = QHBoxLayout()
        self.check = QPushButton("Check again")
        self.check.clicked.connect(controller.refresh)
        bottom.addWidget(self.check)
        bottom.addStretch(1)
        lay.addLayout(bottom)
        self.buttons: dict[str, QPushButton] = {}
        self.states: dict[str, QLabel] = {}
        self._refreshed = False
        controller.changed.connect(self.draw)
        controller.progress.connect(self._on_progress)
        self.draw()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        # The index is fetched when the page is first seen, never at start-up.
        if not self._refreshed:
            self._refreshed = True
            self.controller.refresh()

    def draw(self) -> None:
        c = self.controller
        while self.grid.count():
            item = self.grid.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None:
                widget.deleteLater()
        self.buttons.clear()
        self.states.clear()
        snap = c.snapshot
        row = 0
        if snap is not None:
            in_use = c.in_use
            installed = {r.name for r in snap.installed}
            for r in snap.installed:
                if r.problem:
                    state = f"not usable: {r.problem}"
                elif r.self_test:
                    state = f"self-test {r.self_test}"
                else:
                    state = "self-tested at first use"
                if r.name == in_use:
                    state += " · in use"
                self._row(row, r.name, r.backend or "?", "installed", state, "Remove")
                row += 1
            for p in snap.available:
                if p.name in installed:
                    continue
                note = format_bytes(p.size)
                if p.name == snap.suggested:
                    note += " · suggested for this computer"
                self._row(row, p.name, p.backend, "available", note, "Download")
                row += 1
            if row == 0:
                self.grid.addWidget(QLabel("No runtimes installed, none offered."), 0, 0, 1, 5)
        downloading = c.downloading
        self.progress.setVisible(downloading is not None)
        if downloading is not None:
            button = self.buttons.get(downloading)
            if button is not None:
                button.setText("Cancel")
        for name, button in self.buttons.items():
            button.setEnabled(downloading is None or name == downloading)
        self.check.setEnabled(not c.loading and downloading is None)
        lines = []
        if c.loading:
            lines.append("Looking for runtimes…")
        if snap is not None and snap.index_problem:
            lines.append(f"Packs to download are not available: {snap.index_problem}")
        if c.message:
            lines.append(c.message)
        self.status.setText("\n".join(lines))
        if downloading is not None:
            self._on_progress(downloading, *c.done_bytes)

    def _row(self, row: int, name: str, backend: str, kind: str, state: str, action: str) -> None:
        title = QLabel(name)
        title.setObjectName("code")
        self.grid.addWidget(title, row, 0)
        self.grid.addWidget(QLabel(backend), row, 1)
        self.grid.addWidget(QLabel(kind), row, 2)
        label = QLabel(state)
        label.setWordWrap(True)
        self.grid.addWidget(label, row, 3)
        self.grid.setColumnStretch(3, 1)
        button = QPushButton(action)
        button.clicked.connect(lambda _c=False, n=name, a=action: self._act(n, a))
        self.grid.addWidget(button, row, 4)
        self.buttons[name] = button
        self.states[name] = label

    def _act(self, name: str, action: str) -> None:
        if self.controller.downloading == name:
            self.controller.cancel()
        elif action == "Download":
            self.controller.download(name)
        else:
            self.controller.remove(name)

    def _on_progress(self, name: str, done: int, total: int) -> None:
        self.progress.setMaximum(1000)
        self.progress.setValue(int(1000 * done / total) if total else 0)
        self.progress.setToolTip(f"{name}: {format_bytes(done)} of {format_bytes(total)}")
        if self.controller.downloading == name and done < total:
            self.status.setText(
                f"Downloading the {name} runtime: {format_bytes(done)} of {format_bytes(total)}"
            )
