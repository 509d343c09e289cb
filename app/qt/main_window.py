"""The main window: wires the chat service, the stream worker and the engine supervisor to widgets.

It holds no chat logic of its own: intents go to ChatService, results come
back from workers as plain data, and widgets are redrawn from the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QCloseEvent, QGuiApplication
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.qt.chat_list import ChatList
from app.qt.chat_view import Composer, ConversationView
from app.qt.engine_supervisor import EngineSupervisor
from app.qt.error_panel import ErrorPanel
from app.qt.status_bar import StatusBar
from app.qt.workers import BackgroundCalls, StreamRunner, StreamWorker
from app.services.chat_service import PRESETS, ChatService, Generation
from app.services.chat_store import ChatStore
from app.services.engine_client import Endpoint, EngineClient, Finished
from app.services.engine_launch import LaunchSpec, Ready
from app.services.settings import RemoteEndpoint, Settings, SettingsStore
from engine.default_model import default_model_path
from engine.errors import PeregrineError
from engine.paths import Paths

log = logging.getLogger(__name__)

LOCAL = "Local engine"
RENDER_INTERVAL_MS = 50  # re-render a streaming message at most ~20 times a second
MAX_RENDER_INTERVAL_MS = 1000  # even a huge answer is redrawn once a second


class MainWindow(QMainWindow):
    """Peregrine's chat window."""

    closed = Signal()  # after the engine has stopped: the app may quit now
    answer_started = Signal(int)  # generation id
    answer_finished = Signal(int)  # generation id, after success, stop or failure

    @classmethod
    def on_profile(cls, max_tokens: int) -> MainWindow:
        """A window on PEREGRINE_HOME's profile with the built-in model (screenshots, benchmarks)."""
        paths = Paths.from_env().ensure()
        return cls(
            ChatStore(paths.chats_db),
            SettingsStore(paths.settings_file),
            EngineSupervisor(),
            default_model_path,
            max_tokens=max_tokens,
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
    ) -> None:
        super().__init__()
        self.setWindowTitle("Peregrine")
        self.resize(1180, 780)
        self.store = chat_store
        self.settings_store = settings_store
        self.settings = settings or settings_store.load()
        self.supervisor = supervisor
        self._default_model = default_model
        self.service = ChatService(
            chat_store,
            max_tokens=max_tokens,
            clock=clock,
            default_system_prompt=self.settings.default_system_prompt,
        )
        self.runner = StreamRunner(self)
        self.runner.stream_finished.connect(self._on_stream_finished)
        self.background = BackgroundCalls(self)
        self.current_chat: int | None = None
        self._stream_message: int | None = None
        self._stream_text = ""
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._editing: int | None = None
        self._shutting_down = False
        self._closed = False
        self._build()
        self._connect_supervisor()
        self.refresh_chats()

    # layout -----------------------------------------------------------------

    def _build(self) -> None:
        self.setStyleSheet(theme.STYLESHEET)
        central = QWidget()
        central.setObjectName("central")
        root = QHBoxLayout(central)
        root.setContentsMargins(0, 0, 0, 0)
        root.setSpacing(0)
        self.chat_list = ChatList()
        self.chat_list.new_requested.connect(self.new_chat)
        self.chat_list.selected.connect(self.open_chat)
        self.chat_list.search_changed.connect(lambda _t: self.refresh_chats())
        self.chat_list.rename_requested.connect(self._ask_rename)
        self.chat_list.delete_requested.connect(self._ask_delete)
        root.addWidget(self.chat_list)

        main = QWidget()
        col = QVBoxLayout(main)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(0)
        col.addWidget(self._build_header())
        self.error_panel = ErrorPanel()
        wrap = QWidget()
        wrap_lay = QVBoxLayout(wrap)
        wrap_lay.setContentsMargins(28, 10, 28, 0)
        wrap_lay.addWidget(self.error_panel)
        self.error_panel.setVisible(False)
        col.addWidget(wrap)
        self.conversation = ConversationView()
        self.conversation.copy_requested.connect(self.copy_message)
        self.conversation.edit_requested.connect(self.begin_edit)
        self.conversation.regenerate_requested.connect(lambda _m: self.regenerate())
        col.addWidget(self.conversation, 1)
        self.composer = Composer()
        self.composer.send_requested.connect(self.submit)
        self.composer.stop_requested.connect(self.stop)
        self.composer.edit_cancelled.connect(self.cancel_edit)
        col.addWidget(self.composer)
        root.addWidget(main, 1)
        self.setCentralWidget(central)
        self.status = StatusBar()
        self.setStatusBar(self.status)

    def _build_header(self) -> QWidget:
        header = QWidget()
        header.setObjectName("header")
        header.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)
        lay = QHBoxLayout(header)
        lay.setContentsMargins(28, 10, 20, 10)
        lay.setSpacing(10)
        self.title_label = QLabel("New chat")
        self.title_label.setObjectName("chatTitle")
        lay.addWidget(self.title_label, 1)
        self.preset_box = QComboBox()
        self.preset_box.addItems(list(PRESETS))
        self.preset_box.setCurrentText(self.settings.default_preset)
        self.preset_box.setToolTip("Sampling preset for this chat")
        self.preset_box.currentTextChanged.connect(self._on_preset)
        lay.addWidget(QLabel("Preset"))
        lay.addWidget(self.preset_box)
        self.system_button = QPushButton("System prompt…")
        self.system_button.clicked.connect(self._ask_system_prompt)
        lay.addWidget(self.system_button)
        self.server_box = QComboBox()
        self.server_box.setToolTip("Where answers come from")
        self.server_box.activated.connect(self._on_server_chosen)
        lay.addWidget(self.server_box)
        self._fill_servers()
        return header

    def _fill_servers(self) -> None:
        self.server_box.blockSignals(True)
        self.server_box.clear()
        self.server_box.addItem(LOCAL)
        for endpoint in self.settings.remote_endpoints:
            self.server_box.addItem(endpoint.name)
        self.server_box.addItem("Add server…")
        current = self.settings.active_endpoint or LOCAL
        self.server_box.setCurrentText(current)
        self.server_box.blockSignals(False)

    # engine -----------------------------------------------------------------

    def _connect_supervisor(self) -> None:
        s = self.supervisor
        s.state_changed.connect(self._on_engine_state)
        s.loading.connect(lambda p: self.status.set_engine_state(f"Loading model {p:.0%}", p))
        s.ready.connect(self._on_engine_ready)
        s.failed.connect(self._on_engine_failed)
        s.died.connect(self._on_engine_died)
        s.stopped.connect(self._on_engine_stopped)

    def start_engine(self) -> None:
        """Starts the local engine with the last used model, or the built-in one."""
        model: Path | None = None
        last = self.settings.last_model_path
        if last and Path(last).is_file():
            model = Path(last)
        else:
            try:
                model = self._default_model()
            except PeregrineError as exc:
                self.show_error(f"No model to start: {exc}")
                return
            if last:
                self.show_error(f"The last model ({last}) is missing; using the built-in model.")
        spec = LaunchSpec(
            model=model,
            n_ctx=self.settings.engine.n_ctx,
            threads=self.settings.engine.threads,
            draft_model=Path(self.settings.engine.draft_model)
            if self.settings.engine.draft_model
            else None,
        )
        self.status.set_model(model.stem)
        self.supervisor.start(spec)

    def _on_engine_state(self, state: str) -> None:
        words = {
            "starting": "Engine: starting…",
            "ready": "● Engine ready",
            "restarting": "Engine: restarting…",
            "failed": "Engine: stopped (see the error above)",
            "stopping": "Engine: stopping…",
            "stopped": "Engine: stopped",
        }
        self.status.set_engine_state(words.get(state, state), 0.0 if state == "starting" else None)

    def _on_engine_ready(self, ready: Ready) -> None:
        self.status.set_engine_state("● Engine ready")
        self.status.set_model(ready.model)
        if self.supervisor.spec is not None:
            model = str(self.supervisor.spec.model)
            if self.settings.last_model_path != model:
                self.settings.last_model_path = model
                self._save_settings()
        if self.error_panel.isVisible() and self._engine_error_shown:
            self.error_panel.append_note("The engine is running again.")
        self.refresh_engine_status()

    _engine_error_shown = False

    _engine_failure: str | None = None

    def _on_engine_failed(self, message: str) -> None:
        self._engine_failure = f"The engine could not run: {message}"
        self.show_error(self._engine_failure, self.supervisor.log_tail.text(40))
        self._engine_error_shown = True

    def _explain_no_endpoint(self, then: str) -> None:
        """Why a message cannot go out now; the composer keeps the text."""
        if self.settings.active_endpoint is None and self.supervisor.state == "failed":
            # Keep saying what is wrong (with its log), not "still starting".
            self.show_error(
                f"{self._engine_failure or 'The engine is not running.'} Your message was "
                "not sent; choose another model or restart Peregrine.",
                self.supervisor.log_tail.text(40),
            )
            self._engine_error_shown = True
            return
        self.show_error(f"The engine is still starting; {then}")

    def _on_engine_died(self, message: str) -> None:
        self.show_error(
            f"{message} Restarting it with the same model; your chat is saved.",
            self.supervisor.log_tail.text(40),
        )
        self._engine_error_shown = True

    def refresh_engine_status(self) -> None:
        endpoint = self.endpoint()
        if endpoint is None:
            return

        def fetch() -> dict[str, Any] | None:
            with EngineClient(endpoint, connect_timeout=2.0) as client:
                return client.status()

        self.background.run(fetch, self._on_engine_status)

    def _on_engine_status(self, status: dict[str, Any] | None) -> None:
        if status and not self._shutting_down:
            self.status.set_engine_status(status)

    def endpoint(self) -> Endpoint | None:
        """Where the next answer comes from; None while the local engine is not ready."""
        remote = self.settings.endpoint(self.settings.active_endpoint)
        if remote is not None:
            return Endpoint(remote.base_url, remote.api_key, remote.model)
        ready = self.supervisor.endpoint_info
        if ready is None:
            return None
        return Endpoint(ready.base_url, ready.api_key, ready.model)

    # chats ------------------------------------------------------------------

    def refresh_chats(self) -> None:
        self.chat_list.set_chats(
            self.store.list_chats(self.chat_list.search.text()), self.current_chat
        )

    def new_chat(self) -> int:
        if self.current_chat is not None and not self.store.messages(self.current_chat):
            # An untouched chat is reused instead of piling up empty ones.
            self.open_chat(self.current_chat)
            return self.current_chat
        chat = self.service.new_chat(preset=self.settings.default_preset)
        self.open_chat(chat.id)
        return chat.id

    def open_chat(self, chat_id: int) -> None:
        if self.runner.busy and chat_id != self.current_chat:
            self.stop()
        self.current_chat = chat_id
        chat = self.store.chat(chat_id)
        self.title_label.setText(chat.title)
        self.preset_box.blockSignals(True)
        self.preset_box.setCurrentText(chat.preset)
        self.preset_box.blockSignals(False)
        self.conversation.set_messages(self.store.messages(chat_id))
        self.cancel_edit()
        self.refresh_chats()

    def rename_chat(self, chat_id: int, title: str) -> None:
        try:
            chat = self.store.rename_chat(chat_id, title)
        except PeregrineError as exc:
            self.show_error(str(exc))
            return
        if chat_id == self.current_chat:
            self.title_label.setText(chat.title)
        self.refresh_chats()

    def delete_chat(self, chat_id: int) -> None:
        if chat_id == self.current_chat:
            if self.runner.busy:
                self.stop()
            self.cancel_edit()
            self.current_chat = None
            self.title_label.setText("New chat")
            self.conversation.set_messages([])
        # An answer still winding down for this chat has nowhere to go now.
        self.service.forget_chat(chat_id)
        try:
            self.store.delete_chat(chat_id)
        except PeregrineError as exc:
            self.show_error(str(exc))
        self.refresh_chats()

    def _ask_rename(self, chat_id: int) -> None:
        title, ok = QInputDialog.getText(
            self, "Rename chat", "Title:", QLineEdit.EchoMode.Normal, self.store.chat(chat_id).title
        )
        if ok:
            self.rename_chat(chat_id, title)

    def _ask_delete(self, chat_id: int) -> None:
        title = self.store.chat(chat_id).title
        answer = QMessageBox.question(self, "Delete chat", f"Delete “{title}” and its messages?")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_chat(chat_id)

    def _on_preset(self, preset: str) -> None:
        if self.current_chat is not None and preset:
            self.service.set_preset(self.current_chat, preset)

    def set_system_prompt(self, text: str) -> None:
        if self.current_chat is None:
            self.new_chat()
        assert self.current_chat is not None
        self.store.set_system_prompt(self.current_chat, text)

    def _ask_system_prompt(self) -> None:
        current = self.store.chat(self.current_chat).system_prompt if self.current_chat else ""
        dialog = QDialog(self)
        dialog.setWindowTitle("System prompt for this chat")
        lay = QVBoxLayout(dialog)
        edit = QPlainTextEdit(current)
        edit.setMinimumSize(480, 200)
        lay.addWidget(edit)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(dialog.accept)
        buttons.rejected.connect(dialog.reject)
        lay.addWidget(buttons)
        dialog.accepted.connect(lambda: self.set_system_prompt(edit.toPlainText()))
        dialog.open()

    # remote servers ---------------------------------------------------------

    def add_remote_endpoint(self, endpoint: RemoteEndpoint) -> None:
        others = [e for e in self.settings.remote_endpoints if e.name != endpoint.name]
        self.settings.remote_endpoints = [*others, endpoint]
        self._save_settings()
        self._fill_servers()

    def use_endpoint(self, name: str | None) -> None:
        """Switches answers to a remote server by name, or back to the local engine (None)."""
        if name is not None and self.settings.endpoint(name) is None:
            self.show_error(f"There is no server named {name!r}.")
            return
        self.settings.active_endpoint = name
        self._save_settings()
        self._fill_servers()
        self.status.set_model(
            name or (self.supervisor.endpoint_info.model if self.supervisor.endpoint_info else "")
        )
        self.refresh_engine_status()

    def _on_server_chosen(self, index: int) -> None:
        text = self.server_box.itemText(index)
        if text == LOCAL:
            self.use_endpoint(None)
        elif text == "Add server…":
            self._fill_servers()
            self._ask_server()
        else:
            self.use_endpoint(text)

    def _ask_server(self) -> None:
        dialog = QDialog(self)
        dialog.setWindowTitle("Add an OpenAI-compatible server")
        form = QFormLayout(dialog)
        name, url, key, model = QLineEdit(), QLineEdit(), QLineEdit(), QLineEdit()
        url.setPlaceholderText("http://192.168.1.20:8080/v1")
        key.setEchoMode(QLineEdit.EchoMode.Password)
        model.setPlaceholderText("optional")
        for label, field in (("Name", name), ("URL", url), ("API key", key), ("Model", model)):
            form.addRow(label, field)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.rejected.connect(dialog.reject)
        form.addRow(buttons)
        problem = QLabel()
        problem.setObjectName("hint")
        form.addRow(problem)

        def accept() -> None:
            try:
                endpoint = RemoteEndpoint(
                    name=name.text().strip(),
                    base_url=url.text(),
                    api_key=key.text(),
                    model=model.text().strip(),
                )
            except ValueError as exc:
                # Keep the dialog open with what was typed; say what is wrong.
                problem.setText(str(exc).splitlines()[-1] if str(exc) else "invalid server")
                return
            self.add_remote_endpoint(endpoint)
            self.use_endpoint(endpoint.name)
            dialog.accept()

        buttons.accepted.connect(accept)
        dialog.open()

    # sending ----------------------------------------------------------------

    def submit(self, text: str) -> None:
        """Composer's Enter: send a new message, or resend the message being edited."""
        if self.runner.busy:
            return
        endpoint = self.endpoint()
        if endpoint is None:
            # The text stays in the composer; nothing is lost.
            self._explain_no_endpoint("your message will be ready to send in a moment.")
            return
        try:
            if self._editing is not None:
                generation = self.service.edit_and_resend(self._editing, text)
            else:
                if self.current_chat is None:
                    self.new_chat()
                assert self.current_chat is not None
                generation = self.service.send(self.current_chat, text)
        except PeregrineError as exc:
            self.show_error(str(exc))
            return
        self.composer.input.clear()
        self.cancel_edit()
        if not self._engine_error_shown:
            self.error_panel.clear()
        self._begin_stream(generation, endpoint)

    def regenerate(self) -> None:
        if self.runner.busy or self.current_chat is None:
            return
        endpoint = self.endpoint()
        if endpoint is None:
            self._explain_no_endpoint("try again in a moment.")
            return
        try:
            generation = self.service.regenerate(self.current_chat)
        except PeregrineError as exc:
            self.show_error(str(exc))
            return
        self._begin_stream(generation, endpoint)

    def begin_edit(self, message_id: int) -> None:
        if self.runner.busy:
            return
        self._editing = message_id
        self.composer.begin_edit(self.store.message(message_id).content)

    def cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.composer.input.clear()
        self.composer.end_edit()

    def stop(self) -> None:
        """Stops the answer being written; the text so far is kept."""
        if self.service.request_stop():
            self.runner.cancel()

    def copy_message(self, message_id: int) -> None:
        QGuiApplication.clipboard().setText(self.store.message(message_id).content)

    def _begin_stream(self, generation: Generation, endpoint: Endpoint) -> None:
        generation_id = generation.id
        self.title_label.setText(self.store.chat(generation.chat_id).title)
        # Only what changed is redrawn: rebuilding a long chat costs seconds.
        self.conversation.sync_messages(self.store.messages(generation.chat_id))
        self.refresh_chats()
        self._stream_message = generation.assistant_message_id
        self._stream_text = ""
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        worker = StreamWorker(generation_id, endpoint, generation.messages, generation.params)
        worker.delta.connect(self._on_delta)
        worker.done.connect(self._on_done)
        worker.failed.connect(self._on_failed)
        self.composer.set_streaming(True)
        self.conversation.set_busy(True)
        self.runner.start(worker)
        self.answer_started.emit(generation_id)

    @Slot(int, str)
    def _on_delta(self, generation_id: int, text: str) -> None:
        try:
            self.service.on_delta(generation_id, text)
        except PeregrineError as exc:
            # The text stays on screen and in memory; it is saved once the store takes it.
            self.show_error(
                f"The answer is not being saved yet: {exc}. It is kept and saved as soon "
                "as the chat database accepts it."
            )
        active = self.service.active
        if active is not None and active.id == generation_id:
            self._stream_text += text
            if not self._render_timer.isActive():
                self._render_timer.start()

    def _render_stream(self) -> None:
        if self._stream_message is not None:
            started = time.perf_counter()
            self.conversation.update_message(self._stream_message, self._stream_text, "streaming")
            # A long answer costs more to re-render: wait at least twice that long
            # before the next render, so rendering never takes over the GUI thread.
            cost_ms = (time.perf_counter() - started) * 1000.0
            self._render_timer.setInterval(
                int(min(MAX_RENDER_INTERVAL_MS, max(RENDER_INTERVAL_MS, 2 * cost_ms)))
            )

    @Slot(int, object)
    def _on_done(self, generation_id: int, result: Finished) -> None:
        try:
            message = self.service.on_finished(generation_id, result)
        except PeregrineError as exc:
            self._unsaved_end(exc, "stopped" if result.finish_reason == "cancelled" else "complete")
            return
        if message is None:
            return
        self.status.set_answer_figures(result.timings, result.ttft_ms)
        self._final_render(message.id, message.content, message.status)
        self.refresh_engine_status()

    @Slot(int, str, str)
    def _on_failed(self, generation_id: int, error: str, kind: str) -> None:
        try:
            message = self.service.on_failed(generation_id, error)
        except PeregrineError as exc:
            self._unsaved_end(exc, "interrupted")
            return
        if message is None:
            return
        self._final_render(message.id, message.content, message.status)
        local = self.settings.active_endpoint is None
        if local and self.supervisor.state in ("restarting", "failed", "starting"):
            # The supervisor's message about the engine says more; keep it.
            return
        tail = self.supervisor.log_tail.text(40) if local else None
        self.show_error(f"The answer could not be finished: {error}.", tail)

    @Slot(int)
    def _on_stream_finished(self, generation_id: int) -> None:
        self.composer.set_streaming(False)
        self.conversation.set_busy(False)
        self.answer_finished.emit(generation_id)

    def _unsaved_end(self, exc: PeregrineError, status: str) -> None:
        """The answer ended but could not be saved: show it whole, and say why."""
        if self._stream_message is not None:
            self._final_render(self._stream_message, self._stream_text, status)
        self.show_error(
            f"The answer could not be saved: {exc}. It is kept and saved before your next "
            "message, once there is room."
        )

    def _final_render(self, message_id: int, text: str, status: str) -> None:
        self._render_timer.stop()
        self._stream_message = None
        self.conversation.update_message(message_id, text, status)

    # errors and settings ----------------------------------------------------

    def show_error(self, message: str, log_text: str | None = None) -> None:
        """The one place errors reach the user."""
        log.warning("shown to user: %s", message)
        self._engine_error_shown = False
        self.error_panel.show_error(message, log_text)

    def _save_settings(self) -> None:
        try:
            self.settings_store.save(self.settings)
        except OSError as exc:
            self.show_error(f"Settings could not be saved: {exc}")

    # shutdown ---------------------------------------------------------------

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
        self.hide()
        self.runner.shutdown()
        self.background.shutdown()
        self.supervisor.stop()

    def _on_engine_stopped(self) -> None:
        if self._shutting_down and not self._closed:
            self._closed = True
            self.close()
            self.closed.emit()
