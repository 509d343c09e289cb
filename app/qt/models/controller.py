"""The Models view's controller: lists the library off the GUI thread and runs its actions.

Listing reads every GGUF header (and asks the planner for a fit badge), so it
runs in the background; deletes and imports (a copy of gigabytes) too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QFileDialog

from app.qt.chat.controller import ConfirmFn
from app.qt.engine_controller import EngineController
from app.qt.error_panel import ErrorReporter
from app.qt.models.view import ModelsView
from app.qt.settings.controller import SettingsController
from app.qt.workers import BackgroundCalls
from app.services.models.fit import library_for
from app.services.models.library import Library, LocalFitFn, ModelEntry
from engine.paths import Paths

log = logging.getLogger(__name__)


class ModelsController(QObject):
    """Drives the Models view; `entries_changed` feeds the chat's model picker too."""

    entries_changed = Signal(list)  # list[ModelEntry]
    import_finished = Signal(str, object)  # source path, the new ModelEntry or None

    def __init__(
        self,
        view: ModelsView,
        paths: Paths,
        settings: SettingsController,
        engine: EngineController,
        background: BackgroundCalls,
        errors: ErrorReporter,
        confirm: ConfirmFn,
        *,
        fit: LocalFitFn | None = None,
        builtin: Callable[[], Path] | None = None,
        open_url: Callable[[QUrl], object] = QDesktopServices.openUrl,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.view = view
        self.tab = view.library
        self._paths = paths
        self._settings = settings
        self.engine = engine
        self._background = background
        self._errors = errors
        self._confirm = confirm
        self._fit = fit
        self._builtin = builtin
        self._open_url = open_url
        self.entries: list[ModelEntry] = []
        self._listing = False
        self._again = False
        self._progress: float | None = None
        t = self.tab
        t.refresh_requested.connect(self.refresh)
        t.import_requested.connect(self.ask_import)
        t.load_requested.connect(self.load)
        t.unload_requested.connect(engine.unload)
        t.delete_requested.connect(self.delete)
        t.show_requested.connect(self.show_file)
        engine.model_changed.connect(self._draw_marks)
        engine.load_started.connect(lambda _p: self._on_progress(0.0))
        engine.load_progress.connect(self._on_progress)
        engine.load_finished.connect(lambda _p: self._on_progress(None))
        engine.load_failed.connect(lambda _p, _m: self._on_progress(None))
        settings.library_changed.connect(self.refresh)

    def library(self) -> Library:
        """The library as the settings say now (models folder, scan folders)."""
        return library_for(
            self._paths, self._settings.settings, fit=self._fit, builtin=self._builtin
        )

    # listing --------------------------------------------------------------------

    def refresh(self) -> None:
        """Lists the library again in the background; `entries_changed` follows."""
        if self._listing:
            self._again = True  # one more listing once this one is done
            return
        self._listing = True
        library = self.library()

        def done(entries: list[ModelEntry]) -> None:
            self._listing = False
            self.entries = entries
            self.tab.set_entries(entries)
            self._draw_marks()
            self.entries_changed.emit(entries)
            if self._again:
                self._again = False
                self.refresh()

        def failed(message: str) -> None:
            self._listing = False
            self._errors.show(f"The model library could not be listed: {message}")

        self._background.run(library.entries, done, failed, what="Listing models")

    @property
    def listing(self) -> bool:
        """True while a listing runs or one more is due."""
        return self._listing or self._again

    def _draw_marks(self) -> None:
        self.tab.set_marks(self.engine.current, self.engine.loading, self._progress)

    def _on_progress(self, progress: float | None) -> None:
        self._progress = progress
        self._draw_marks()

    # actions ----------------------------------------------------------------------

    def load(self, entry: ModelEntry) -> None:
        if not entry.valid:
            self._errors.show(f"{entry.name} cannot be loaded: {entry.error}")
            return
        self.engine.load(entry.path)

    def delete(self, entry: ModelEntry) -> None:
        """Deletes one of Peregrine's own models after asking; never the model in use."""
        if entry.read_only:
            self._errors.show(
                f"{entry.name} belongs to another app; Peregrine only lists it and never "
                "deletes other apps' files."
            )
            return
        if entry.path in (self.engine.current, self.engine.loading):
            self._errors.show(f"{entry.name} is in use; unload it or load another model first.")
            return
        size = entry.size / 2**30
        question = (
            f"Delete {entry.name} ({size:.1f} GiB) from Peregrine's models folder?\n"
            "The file is removed from disk; download or import it again to use it."
        )
        if not self._confirm("Delete model", question, "Delete"):
            return
        library = self.library()
        self._background.run(
            lambda: library.delete(entry),
            lambda _removed: self.refresh(),
            what=f"Deleting {entry.name}",
        )

    def show_file(self, entry: ModelEntry) -> None:
        """Opens the folder holding the model in the file manager."""
        folder = self.library().reveal(entry)
        if not self._open_url(QUrl.fromLocalFile(str(folder))):
            self._errors.show(f"No file manager could open {folder}.")

    def ask_import(self) -> None:
        dialog = QFileDialog(self.view.window(), "Import GGUF models")
        dialog.setFileMode(QFileDialog.FileMode.ExistingFiles)
        dialog.setNameFilter("GGUF models (*.gguf);;All files (*)")
        dialog.filesSelected.connect(lambda files: self.import_files([Path(f) for f in files]))
        self.import_dialog = dialog
        dialog.open()

    def import_files(self, files: Sequence[Path]) -> None:
        """Copies GGUF files into the models folder (validated first); one failure each."""
        library = self.library()
        for source in files:
            self._import_one(library, source)

    def _import_one(self, library: Library, source: Path) -> None:
        self.tab.set_busy(f"Importing {source.name}…")

        def done(entry: ModelEntry) -> None:
            self.refresh()
            self.import_finished.emit(str(source), entry)

        def failed(message: str) -> None:
            self._errors.show(f"{source.name} was not imported: {message}")
            self.refresh()
            self.import_finished.emit(str(source), None)

        self._background.run(
            lambda: library.import_file(source), done, failed, what=f"Importing {source.name}"
        )
