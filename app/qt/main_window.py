"""The main window: assembles the views and their controllers, and nothing more.

Chat, Models and Settings are pages of one stack, reached from the navigation
rail or with Ctrl+1/2/3. Errors of every part go to one banner above the pages;
the status bar describes the server answers come from. A .gguf file dropped
anywhere on the window is imported into the library.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import (
    QCloseEvent,
    QDesktopServices,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
    QShortcut,
)
from PySide6.QtWidgets import (
    QHBoxLayout,
    QMainWindow,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.qt.chat.controller import ChatController, ConfirmFn
from app.qt.chat.view import ChatView
from app.qt.dialogs.confirm import confirm as ask
from app.qt.engine_controller import EngineController
from app.qt.engine_supervisor import EngineSupervisor
from app.qt.error_panel import ErrorPanel, ErrorReporter
from app.qt.models.controller import ModelsController
from app.qt.models.discover_controller import DiscoverController, HubWiring
from app.qt.models.downloads_controller import (
    DownloaderFactory,
    DownloadsController,
    default_downloader,
)
from app.qt.models.view import ModelsView
from app.qt.navigation import NavRail, Page
from app.qt.settings.controller import SettingsController
from app.qt.settings.runtimes import RuntimesController
from app.qt.settings.view import SettingsView
from app.qt.status_bar import StatusBar
from app.qt.status_controller import StatusController
from app.qt.wizard.controller import MeasureFn, WizardController
from app.qt.workers import BackgroundCalls
from app.services.chat.store import ChatStore
from app.services.models.fit import HardwareSource, planner_wiring
from app.services.models.library import LocalFitFn
from app.services.settings import Settings, SettingsStore
from engine.default_model import default_model_path
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.planning.probe import measure as probe_measure

log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    """Peregrine's window: navigation rail, error banner, pages, status bar."""

    closed = Signal()  # after the engine has stopped: the app may quit now

    @classmethod
    def on_profile(cls, max_tokens: int, hardware: HardwareSource | None = None) -> MainWindow:
        """A window on PEREGRINE_HOME's profile with the built-in model (screenshots, benchmarks)."""
        paths = Paths.from_env().ensure()
        hardware = hardware or HardwareSource()
        fit, pick, reader = planner_wiring(hardware)
        return cls(
            ChatStore(paths.chats_db),
            SettingsStore(paths.settings_file),
            EngineSupervisor(),
            default_model_path,
            max_tokens=max_tokens,
            paths=paths,
            fit=fit,
            hardware=hardware,
            hub_wiring=HubWiring(fit, pick, reader),
        )

    def __init__(
        self,
        chat_store: ChatStore,
        settings_store: SettingsStore,
        supervisor: EngineSupervisor,
        default_model: Callable[[], Path],
        settings: Settings | None = None,
        max_tokens: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        *,
        paths: Paths | None = None,
        fit: LocalFitFn | None = None,
        confirm: ConfirmFn | None = None,
        open_url: Callable[[QUrl], object] | None = None,
        hardware: HardwareSource | None = None,
        measure: MeasureFn | None = None,
        hub_wiring: HubWiring | None = None,
        make_downloader: DownloaderFactory = default_downloader,
    ) -> None:
        super().__init__()
        self.setWindowTitle("Peregrine")
        self.resize(1180, 780)
        self.setAcceptDrops(True)
        self.store = chat_store
        self.supervisor = supervisor
        self._shutting_down = False
        self._closed = False
        confirm = confirm or (lambda title, q, action: ask(self, title, q, action))

        self.error_panel = ErrorPanel()
        self.errors = ErrorReporter(self.error_panel)
        self.background = BackgroundCalls(lambda message: self.errors.show(message), self)
        self.settings = SettingsController(
            settings_store,
            settings or settings_store.load(),
            lambda message: self.errors.show(message),
            self,
        )
        self.palette_ = theme.palette_for(self.settings.settings.theme)
        self.engine = EngineController(
            supervisor, self.settings, default_model, self.background, self.errors, self
        )
        self.chat_view = ChatView()
        self.chat = ChatController(
            self.chat_view,
            chat_store,
            self.settings,
            self.engine,
            self.errors,
            confirm,
            max_tokens=max_tokens,
            clock=clock,
            parent=self,
        )
        self.models_view = ModelsView(self.palette_)
        self.models = ModelsController(
            self.models_view,
            paths or Paths.from_env(),
            self.settings,
            self.engine,
            self.background,
            self.errors,
            confirm,
            fit=fit,
            builtin=default_model,
            **({"open_url": open_url} if open_url is not None else {}),
            parent=self,
        )
        self.discover = DiscoverController(
            self.models_view.discover,
            self.settings,
            self.errors,
            hub_wiring or HubWiring(),
            open_url=open_url or QDesktopServices.openUrl,
            parent=self,
        )
        self.downloads = DownloadsController(
            self.models_view.downloads,
            paths or Paths.from_env(),
            self.settings,
            self.engine,
            self.errors,
            make_downloader=make_downloader,
            parent=self,
        )
        self.runtimes = RuntimesController(
            paths or Paths.from_env(),
            self.background,
            lambda: self.status.runtime_in_use,
            parent=self,
        )
        self.settings_view = SettingsView(self.settings, self.runtimes)
        self._default_model = default_model
        self.hardware = hardware or HardwareSource()
        self.wizard = WizardController(
            self,
            self.palette_,
            self.hardware,
            self.engine,
            self.settings,
            self.background,
            confirm,
            lambda: self.models.entries,
            measure_fn=measure or probe_measure,
            parent=self,
        )
        self.status = StatusBar()
        self.status_control = StatusController(
            self.status,
            self.engine,
            lambda: self.settings.settings,
            self.chat.endpoint,
            self.background,
            self,
        )
        self._layout()
        self._wire()
        self.apply_theme()
        self.models.refresh()

    # assembly ------------------------------------------------------------------------

    def _layout(self) -> None:
        central = QWidget()
        central.setObjectName("central")
        root = QHBoxLayout(central)
        root.setContentsMargins(0, 0, 0, 0)
        root.setSpacing(0)
        self.nav = NavRail()
        root.addWidget(self.nav)
        column = QVBoxLayout()
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        # The banner moves to the page shown (under the chat's header, under a page's title);
        # hidden, it takes no room (its margins live in the stylesheet).
        self.chat_view.banner.addWidget(self.error_panel)
        self.pages = QStackedWidget()
        for page in (self.chat_view, self.models_view, self.settings_view):
            self.pages.addWidget(page)
        column.addWidget(self.pages, 1)
        root.addLayout(column, 1)
        self.setCentralWidget(central)
        self.setStatusBar(self.status)

    def _wire(self) -> None:
        self.nav.chosen.connect(self.show_page)
        for page in Page:
            shortcut = QShortcut(QKeySequence(f"Ctrl+{page.value + 1}"), self)
            shortcut.activated.connect(lambda p=page: self.show_page(p))
        pick = QShortcut(QKeySequence("Ctrl+L"), self)
        pick.activated.connect(self._pick_model)
        self.chat.manage_models.connect(lambda: self.show_page(Page.MODELS))
        self.chat.endpoint_changed.connect(self.status_control.server_changed)
        self.chat.answer_figures.connect(self.status_control.answer_done)
        self.models.entries_changed.connect(self.chat.set_models)
        self.settings.theme_changed.connect(lambda _t: self.apply_theme())
        self.settings.local_api_changed.connect(self.engine.restart)
        self.supervisor.stopped.connect(self._on_engine_stopped)
        # The wizard's doors: Settings → Engine, and a model's "Load with settings…".
        plan_button = QPushButton("Memory and load settings…")
        plan_button.setToolTip(
            "Budgets per device, context, KV cache and offload, with the planner"
        )
        plan_button.clicked.connect(lambda: self.open_wizard())
        self.settings_view.engine.form.addRow("Memory", plan_button)
        self.models_view.library.add_action(
            "Load with settings…", lambda entry: self.open_wizard(entry.path)
        )
        self.discover.download_requested.connect(self._download)
        self.discover.settings_requested.connect(lambda: self.show_page(Page.SETTINGS))
        self.downloads.finished.connect(lambda _st: self.models.refresh())
        self.downloads.status_changed.connect(
            lambda _st: self.models_view.set_downloads_count(self.downloads.active)
        )
        self.models_view.downloads.discover_requested.connect(
            lambda: self.models_view.show_tab(self.models_view.discover)
        )

    def _download(self, repo_id: str, files: list[str], revision: str | None) -> None:
        """Queues a download and shows it in the Downloads tab."""
        self.downloads.add(repo_id, files, revision)
        self.models_view.show_tab(self.models_view.downloads)

    def show_page(self, page: Page) -> None:
        view = (self.chat_view, self.models_view, self.settings_view)[page.value]
        shown = self.error_panel.isVisibleTo(self)
        view.banner.addWidget(self.error_panel)  # reparenting hides it: restore
        self.error_panel.setVisible(shown)
        self.pages.setCurrentIndex(page.value)
        self.nav.show_page(page)
        if page is Page.CHAT:
            self.chat_view.composer.input.setFocus()
        elif page is Page.MODELS:
            self.models_view.library.table.setFocus()

    @property
    def page(self) -> Page:
        return Page(self.pages.currentIndex())

    def _pick_model(self) -> None:
        self.show_page(Page.CHAT)
        self.chat_view.header.model_box.setFocus()
        self.chat_view.header.model_box.showPopup()

    def apply_theme(self) -> None:
        self.palette_ = theme.palette_for(self.settings.settings.theme)
        self.setStyleSheet(theme.stylesheet(self.palette_))
        self.chat.set_palette(self.palette_)
        self.models_view.library.set_palette(self.palette_)
        self.wizard.set_palette(self.palette_)
        self.models_view.discover.set_palette(self.palette_)

    # engine ----------------------------------------------------------------------------

    def start_engine(self) -> None:
        """Starts the local engine with the last model and its settings, or the built-in one."""
        self.engine.start()

    def open_wizard(self, model: Path | None = None, *, first_run: bool = False) -> None:
        """The VRAM-budget wizard for `model` (default: the model in use, else the last one)."""
        if model is None:
            last = self.settings.settings.last_model_path
            model = self.engine.current or self.engine.loading or (Path(last) if last else None)
        if model is None:
            try:
                model = self._default_model()
            except PeregrineError as exc:
                self.errors.show(f"No model to plan for: {exc}")
                return
        self.wizard.open(model, first_run=first_run)
        if first_run:
            self.settings.mark_wizard_shown()

    def show_error(self, message: str, log_text: str | None = None) -> None:
        """The one place errors reach the user."""
        self.errors.show(message, log_text)

    # drag and drop -----------------------------------------------------------------------

    @staticmethod
    def _dropped_files(urls: list[QUrl]) -> list[Path]:
        return [Path(u.toLocalFile()) for u in urls if u.isLocalFile() and u.toLocalFile()]

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        files = self._dropped_files(event.mimeData().urls())
        if files and all(f.suffix.lower() == ".gguf" for f in files):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:
        files = self._dropped_files(event.mimeData().urls())
        if not files:
            event.ignore()
            return
        event.acceptProposedAction()
        self.show_page(Page.MODELS)
        self.models.import_files(files)

    # shutdown ----------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:
        if self._closed:
            event.accept()
            return
        event.ignore()
        self.shut_down()

    def shut_down(self) -> None:
        """Stops the stream and the engine, then emits closed; safe to call twice."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.status_control.closing = True
        self.hide()
        self.chat.shutdown()
        self.downloads.shutdown()
        self.discover.shutdown()
        self.runtimes.shutdown()
        self.background.shutdown()
        self.supervisor.stop()

    def _on_engine_stopped(self) -> None:
        if self._shutting_down and not self._closed:
            self._closed = True
            self.close()
            self.closed.emit()
