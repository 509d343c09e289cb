"""The Chat view's controller: chats, sending and streaming, remote servers, the model picker.

It holds no chat logic of its own: intents go to ChatService, results come
back from workers as plain data, and widgets are redrawn from the store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal, Slot
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QInputDialog, QLineEdit, QWidget

from app.qt import theme
from app.qt.chat.view import ChatView
from app.qt.dialogs.add_server import AddServerDialog
from app.qt.dialogs.system_prompt import SystemPromptDialog
from app.qt.dialogs.tools import ToolsDialog
from app.qt.engine_controller import EngineController
from app.qt.error_panel import ErrorReporter
from app.qt.settings.controller import SettingsController
from app.qt.workers import StreamRunner, StreamWorker
from app.services.chat.service import ChatService, Generation
from app.services.chat.store import ChatStore
from app.services.engine.client import Endpoint, ErrorKind, Finished
from app.services.engine.launch import SupervisorState
from app.services.models.library import ModelEntry
from app.services.settings import RemoteEndpoint
from engine.errors import PeregrineError

log = logging.getLogger(__name__)

RENDER_INTERVAL_MS = 50  # re-render a streaming message at most ~20 times a second
MAX_RENDER_INTERVAL_MS = 1000  # even a huge answer is redrawn once a second

ConfirmFn = Callable[[str, str, str], bool]  # title, question, action -> confirmed


class ChatController(QObject):
    """Drives the Chat view."""

    answer_started = Signal(int)  # generation id
    answer_finished = Signal(int)  # generation id, after success, stop or failure
    answer_figures = Signal(object, object)  # timings dict, ttft ms | None
    endpoint_changed = Signal()  # answers come from another server now
    manage_models = Signal()

    def __init__(
        self,
        view: ChatView,
        store: ChatStore,
        settings: SettingsController,
        engine: EngineController,
        errors: ErrorReporter,
        confirm: ConfirmFn,
        max_tokens: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.view = view
        self.store = store
        self._settings = settings
        self.engine = engine
        self._errors = errors
        self._confirm = confirm
        self.service = ChatService(
            store,
            max_tokens=max_tokens,
            clock=clock,
            default_system_prompt=settings.settings.default_system_prompt,
        )
        self.runner = StreamRunner(self)
        self.runner.stream_finished.connect(self._on_stream_finished)
        self.current_chat: int | None = None
        self._stream_message: int | None = None
        self._stream_text = ""
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)
        self._editing: int | None = None
        self._models: list[ModelEntry] = []
        self._connect()
        self.view.header.set_preset(settings.settings.default_preset)
        self._fill_servers()
        self.refresh_chats()

    def _connect(self) -> None:
        v = self.view
        v.chat_list.new_requested.connect(self.new_chat)
        v.chat_list.selected.connect(self.open_chat)
        v.chat_list.search_changed.connect(lambda _t: self.refresh_chats())
        v.chat_list.rename_requested.connect(self._ask_rename)
        v.chat_list.delete_requested.connect(self._ask_delete)
        v.conversation.copy_requested.connect(self.copy_message)
        v.conversation.edit_requested.connect(self.begin_edit)
        v.conversation.regenerate_requested.connect(lambda _m: self.regenerate())
        v.conversation.result_submitted.connect(self.send_tool_result)
        v.composer.send_requested.connect(self.submit)
        v.composer.stop_requested.connect(self.stop)
        v.composer.edit_cancelled.connect(self.cancel_edit)
        h = v.header
        h.preset_chosen.connect(self._on_preset)
        h.system_prompt_requested.connect(self._ask_system_prompt)
        h.tools_requested.connect(self._ask_tools)
        h.server_chosen.connect(self.use_endpoint)
        h.add_server_requested.connect(self._ask_server)
        h.model_chosen.connect(lambda path: self.engine.load(Path(path)))
        h.manage_models.connect(self._on_manage_models)
        e = self.engine
        e.model_changed.connect(self._draw_models)
        e.load_started.connect(lambda _p: self._draw_models())
        e.load_finished.connect(lambda _p: self._draw_models())
        e.load_failed.connect(lambda _p, _m: self._draw_models())
        e.supervisor.ready.connect(lambda _r: self._errors.note("The engine is running again."))

    # models -------------------------------------------------------------------

    def set_models(self, entries: list[ModelEntry]) -> None:
        """The library's models, for the picker."""
        self._models = entries
        self._draw_models()

    def _draw_models(self) -> None:
        self.view.header.set_models(
            self._models,
            self.engine.current or self.engine.loading,
            self.engine.loading is not None,
        )

    def _on_manage_models(self) -> None:
        self._draw_models()  # the picker shows the model again, not "Manage models…"
        self.manage_models.emit()

    def set_palette(self, palette: theme.Palette) -> None:
        self.view.conversation.set_palette(palette)
        if self.current_chat is not None:
            self.view.conversation.set_messages(self.store.messages(self.current_chat))

    # where answers come from ----------------------------------------------------

    def endpoint(self) -> Endpoint | None:
        """Where the next answer comes from; None while the local engine is not ready."""
        remote = self._settings.settings.endpoint(self._settings.settings.active_endpoint)
        if remote is not None:
            return Endpoint(remote.base_url, remote.api_key, remote.model)
        return self.engine.endpoint()

    @property
    def is_local(self) -> bool:
        return self._settings.settings.active_endpoint is None

    def _fill_servers(self) -> None:
        s = self._settings.settings
        self.view.header.set_servers([e.name for e in s.remote_endpoints], s.active_endpoint)

    def add_remote_endpoint(self, endpoint: RemoteEndpoint) -> None:
        s = self._settings.settings
        others = [e for e in s.remote_endpoints if e.name != endpoint.name]
        s.remote_endpoints = [*others, endpoint]
        self._settings.save()
        self._fill_servers()

    def use_endpoint(self, name: str | None) -> None:
        """Switches answers to a remote server by name, or back to the local engine (None)."""
        if name is not None and self._settings.settings.endpoint(name) is None:
            self._errors.show(f"There is no server named {name!r}.")
            return
        self._settings.settings.active_endpoint = name
        self._settings.save()
        self._fill_servers()
        self.endpoint_changed.emit()

    def _ask_server(self) -> None:
        self._fill_servers()  # the box shows the server in use, not "Add server…"

        def accepted(endpoint: RemoteEndpoint) -> None:
            self.add_remote_endpoint(endpoint)
            self.use_endpoint(endpoint.name)

        self.server_dialog = AddServerDialog(accepted, self._parent_widget())
        self.server_dialog.open()

    def _parent_widget(self) -> QWidget:
        return self.view.window()

    # chats --------------------------------------------------------------------

    def refresh_chats(self) -> None:
        self.view.chat_list.set_chats(
            self.store.list_chats(self.view.chat_list.search.text()), self.current_chat
        )

    def new_chat(self) -> int:
        if self.current_chat is not None and not self.store.messages(self.current_chat):
            # An untouched chat is reused instead of piling up empty ones.
            self.open_chat(self.current_chat)
            return self.current_chat
        chat = self.service.new_chat(preset=self._settings.settings.default_preset)
        self.open_chat(chat.id)
        return chat.id

    def open_chat(self, chat_id: int) -> None:
        if self.runner.busy and chat_id != self.current_chat:
            self.stop()
        self.current_chat = chat_id
        chat = self.store.chat(chat_id)
        self.view.header.title.setText(chat.title)
        self.view.header.set_preset(chat.preset)
        self._draw_tools()
        self.view.conversation.set_messages(self.store.messages(chat_id))
        self.cancel_edit()
        self.refresh_chats()

    def rename_chat(self, chat_id: int, title: str) -> None:
        try:
            chat = self.store.rename_chat(chat_id, title)
        except PeregrineError as exc:
            self._errors.show(str(exc))
            return
        if chat_id == self.current_chat:
            self.view.header.title.setText(chat.title)
        self.refresh_chats()

    def delete_chat(self, chat_id: int) -> None:
        if chat_id == self.current_chat:
            if self.runner.busy:
                self.stop()
            self.cancel_edit()
            self.current_chat = None
            self.view.header.title.setText("New chat")
            self.view.conversation.set_messages([])
            self._draw_tools()
        # An answer still winding down for this chat has nowhere to go now.
        self.service.forget_chat(chat_id)
        try:
            self.store.delete_chat(chat_id)
        except PeregrineError as exc:
            self._errors.show(str(exc))
        self.refresh_chats()

    def _ask_rename(self, chat_id: int) -> None:
        title, ok = QInputDialog.getText(
            self._parent_widget(),
            "Rename chat",
            "Title:",
            QLineEdit.EchoMode.Normal,
            self.store.chat(chat_id).title,
        )
        if ok:
            self.rename_chat(chat_id, title)

    def _ask_delete(self, chat_id: int) -> None:
        title = self.store.chat(chat_id).title
        if self._confirm("Delete chat", f"Delete “{title}” and its messages?", "Delete"):
            self.delete_chat(chat_id)

    def _on_preset(self, preset: str) -> None:
        if self.current_chat is not None:
            self.service.set_preset(self.current_chat, preset)

    def set_system_prompt(self, text: str) -> None:
        if self.current_chat is None:
            self.new_chat()
        assert self.current_chat is not None
        self.store.set_system_prompt(self.current_chat, text)

    def _ask_system_prompt(self) -> None:
        current = self.store.chat(self.current_chat).system_prompt if self.current_chat else ""
        self.prompt_dialog = SystemPromptDialog(
            current, self.set_system_prompt, self._parent_widget()
        )
        self.prompt_dialog.open()

    # tools --------------------------------------------------------------------

    def set_tools(self, text: str, enabled: bool, choice: str) -> None:
        """Saves the current chat's tools; raises ToolSpecError (nothing saved) when wrong."""
        if self.current_chat is None:
            self.new_chat()
        assert self.current_chat is not None
        self.service.set_tools(self.current_chat, text, enabled, choice)
        self._draw_tools()

    def _draw_tools(self) -> None:
        if self.current_chat is None:
            self.view.header.set_tools_state(0, False)
            return
        chat = self.store.chat(self.current_chat)
        tools = self.service.tools(self.current_chat)
        self.view.header.set_tools_state(
            len(tools.tools), chat.tools_enabled and bool(tools.tools), chat.tool_choice
        )

    def _ask_tools(self) -> None:
        if self.current_chat is not None:
            chat = self.store.chat(self.current_chat)
            text, enabled, choice = chat.tools, chat.tools_enabled, chat.tool_choice
        else:
            text, enabled, choice = "", False, "auto"
        self.tools_dialog = ToolsDialog(
            text, enabled, choice, self.set_tools, self._parent_widget()
        )
        self.tools_dialog.open()

    def send_tool_result(self, message_id: int, call_id: str, text: str) -> None:
        """A call's "Send result": saves it as a tool message and continues the answer."""
        if self.runner.busy:
            return
        endpoint = self.endpoint()
        if endpoint is None:
            # The result stays typed in its box; nothing is lost.
            self._explain_no_endpoint("the result will be ready to send in a moment.")
            return
        try:
            generation = self.service.send_tool_result(message_id, call_id, text)
        except PeregrineError as exc:
            self._errors.show(str(exc))
            return
        self.view.conversation.forget_draft(call_id)
        self._errors.clear_unless_engine()
        if generation is None:
            # Other calls of this answer still wait for their results.
            chat_id = self.store.message(message_id).chat_id
            self.view.conversation.sync_messages(self.store.messages(chat_id))
            return
        self._begin_stream(generation, endpoint)

    # sending ------------------------------------------------------------------

    def _explain_no_endpoint(self, then: str) -> None:
        """Why a message cannot go out now; the composer keeps the text."""
        if self.is_local and self.engine.supervisor.state is SupervisorState.FAILED:
            # Keep saying what is wrong (with its log), not "still starting".
            self._errors.show(
                f"{self.engine.failure or 'The engine is not running.'} Your message was "
                "not sent; choose another model or restart Peregrine.",
                self.engine.supervisor.log_tail.text(40),
                engine=True,
            )
            return
        self._errors.show(f"The engine is still starting; {then}")

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
            self._errors.show(str(exc))
            return
        self.view.composer.input.clear()
        self.cancel_edit()
        self._errors.clear_unless_engine()
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
            self._errors.show(str(exc))
            return
        self._begin_stream(generation, endpoint)

    def begin_edit(self, message_id: int) -> None:
        if self.runner.busy:
            return
        self._editing = message_id
        self.view.composer.begin_edit(self.store.message(message_id).content)

    def cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.view.composer.input.clear()
        self.view.composer.end_edit()

    def stop(self) -> None:
        """Stops the answer being written; the text so far is kept."""
        if self.service.request_stop():
            self.runner.cancel()

    def copy_message(self, message_id: int) -> None:
        message = self.store.message(message_id)
        text = message.content
        if message.tool_calls:
            # An answer that called tools: its text, then the calls in OpenAI's JSON.
            calls = json.dumps(message.tool_calls, indent=2, ensure_ascii=False)
            text = f"{text}\n\n{calls}" if text else calls
        QGuiApplication.clipboard().setText(text)

    def _begin_stream(self, generation: Generation, endpoint: Endpoint) -> None:
        generation_id = generation.id
        self.view.header.title.setText(self.store.chat(generation.chat_id).title)
        # Only what changed is redrawn: rebuilding a long chat costs seconds.
        self.view.conversation.sync_messages(self.store.messages(generation.chat_id))
        self.refresh_chats()
        self._stream_message = generation.assistant_message_id
        self._stream_text = ""
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        params = dict(generation.params)
        if self.is_local and not self._settings.settings.engine.speculation:
            params["speculative"] = {"type": "none"}  # Peregrine's field; remote servers differ
        worker = StreamWorker(generation_id, endpoint, generation.messages, params)
        worker.delta.connect(self._on_delta)
        worker.done.connect(self._on_done)
        worker.failed.connect(self._on_failed)
        self.view.composer.set_streaming(True)
        self.view.conversation.set_busy(True)
        self.runner.start(worker)
        self.answer_started.emit(generation_id)

    @Slot(int, str)
    def _on_delta(self, generation_id: int, text: str) -> None:
        try:
            self.service.on_delta(generation_id, text)
        except PeregrineError as exc:
            # The text stays on screen and in memory; it is saved once the store takes it.
            self._errors.show(
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
            self.view.conversation.update_message(
                self._stream_message, self._stream_text, "streaming"
            )
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
        self.answer_figures.emit(result.timings, result.ttft_ms)
        self._final_render(message.id, message.content, message.status)
        if message.tool_calls and message.chat_id == self.current_chat:
            # The calls arrive with the end of the answer: draw their blocks.
            self.view.conversation.sync_messages(self.store.messages(message.chat_id))

    @Slot(int, str, object)
    def _on_failed(self, generation_id: int, error: str, kind: ErrorKind) -> None:
        try:
            message = self.service.on_failed(generation_id, error)
        except PeregrineError as exc:
            self._unsaved_end(exc, "interrupted")
            return
        if message is None:
            return
        self._final_render(message.id, message.content, message.status)
        state = self.engine.supervisor.state
        if self.is_local and state in (
            SupervisorState.RESTARTING,
            SupervisorState.FAILED,
            SupervisorState.STARTING,
        ):
            # The supervisor's message about the engine says more; keep it.
            return
        tail = self.engine.supervisor.log_tail.text(40) if self.is_local else None
        log.info("answer failed (%s): %s", kind, error)
        self._errors.show(f"The answer could not be finished: {error}.", tail)

    @Slot(int)
    def _on_stream_finished(self, generation_id: int) -> None:
        self.view.composer.set_streaming(False)
        self.view.conversation.set_busy(False)
        self.answer_finished.emit(generation_id)

    def _unsaved_end(self, exc: PeregrineError, status: str) -> None:
        """The answer ended but could not be saved: show it whole, and say why."""
        if self._stream_message is not None:
            self._final_render(self._stream_message, self._stream_text, status)
        self._errors.show(
            f"The answer could not be saved: {exc}. It is kept and saved before your next "
            "message, once there is room."
        )

    def _final_render(self, message_id: int, text: str, status: str) -> None:
        self._render_timer.stop()
        self._stream_message = None
        self.view.conversation.update_message(message_id, text, status)

    def shutdown(self) -> None:
        self.runner.shutdown()
