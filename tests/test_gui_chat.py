"""The chat window against the real engine and the real model (pytest-qt, offscreen).

A GUI-thread watchdog is active whenever an answer streams.
"""

from __future__ import annotations

import http.server
import itertools
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt, QUrl
from PySide6.QtWidgets import QApplication
from pytestqt.qtbot import QtBot

from app.qt.main_window import MainWindow
from app.services.chat.service import PRESETS
from app.services.chat.store import ChatStore, ChatStoreUnavailable
from app.services.engine.client import EngineClient
from app.services.settings import RemoteEndpoint, SettingsStore
from engine.paths import Paths
from tests.engine_proc import running_engine
from tests.gui_watchdog import GuiWatchdog
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt, pytest.mark.slow]

ENGINE_START_MS = 180_000  # the shared CI CPU can be very slow
ANSWER_MS = 180_000


@pytest.fixture
def watchdog(qtbot: QtBot) -> Iterator[GuiWatchdog]:
    """Armed while answers stream in any window the test watches."""
    dog = GuiWatchdog(limit_s=1.0).start()
    yield dog
    dog.stop()
    print(
        f"\nworst GUI event-loop lag while streaming: {dog.worst_lag_s * 1000:.1f} ms"
        f" ({dog.beats} beats, {dog.armed_s:.1f} s streaming)"
    )
    dog.check()


@pytest.fixture
def window(qtbot: QtBot, default_model: Path, watchdog: GuiWatchdog) -> Iterator[MainWindow]:
    """The app with its own engine, started and ready; the watchdog follows its answers."""
    w = make_window(qtbot, default_model)
    watchdog.watch_streams(w.chat.answer_started, w.chat.answer_finished)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    yield w
    close_window(qtbot, w)


class RenderLog:
    """Records what the conversation view was asked to draw for a message."""

    def __init__(self, window: MainWindow) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self.db_seen_while_streaming: list[str] = []
        self._db = sqlite3.connect(str(window.store.path))
        original = window.chat_view.conversation.update_message

        def spy(message_id: int, text: str, status: str) -> None:
            self.calls.append((message_id, text, status))
            if status == "streaming" and text and not self.db_seen_while_streaming:
                # Another connection sees the answer as it streams: it is committed.
                row = self._db.execute(
                    "SELECT content, status FROM messages WHERE id=?", (message_id,)
                ).fetchone()
                self.db_seen_while_streaming.append(f"{row[1]}:{row[0]}")
            original(message_id, text, status)

        window.chat_view.conversation.update_message = spy  # type: ignore[method-assign]

    def partials(self) -> list[str]:
        return [t for _, t, s in self.calls if s == "streaming" and t]


def send_by_keyboard(qtbot: QtBot, window: MainWindow, text: str) -> None:
    qtbot.keyClicks(window.chat_view.composer.input, text)
    qtbot.keyClick(window.chat_view.composer.input, Qt.Key.Key_Return)


def test_type_send_and_see_the_answer_stream_and_saved(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    renders = RenderLog(window)
    # Shift+Enter is a new line, not a send.
    qtbot.keyClicks(window.chat_view.composer.input, "Write a Python function")
    qtbot.keyClick(
        window.chat_view.composer.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier
    )
    assert window.chat.service.active is None
    assert "\n" in window.chat_view.composer.input.toPlainText()
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "that adds two numbers.")
    chat_id = window.chat.current_chat
    assert chat_id is not None
    user, answer = window.store.messages(chat_id)
    assert user.content == "Write a Python function\nthat adds two numbers."
    assert answer.status == "complete" and answer.content
    assert answer.meta["usage"]["completion_tokens"] >= 1
    # Tokens appeared progressively: several growing partial renders before the final one.
    partials = renders.partials()
    assert len(set(partials)) >= 2
    for a, b in itertools.pairwise(partials):
        assert b.startswith(a)
    assert answer.content.startswith(partials[-1])
    assert renders.db_seen_while_streaming[0].startswith("streaming:")
    assert len(renders.db_seen_while_streaming[0]) > len("streaming:")
    # The widget shows what is stored, and the status bar shows the figures.
    assert window.chat_view.conversation.widgets[answer.id].text == answer.content
    assert "tok/s" in window.status.speed.text() and "—" not in window.status.speed.text()
    assert window.status.ttft.text().startswith("TTFT ") and "ms" in window.status.ttft.text()
    qtbot.waitUntil(lambda: "4,096" in window.status.context.text(), timeout=30_000)
    qtbot.waitUntil(lambda: "MiB" in window.status.memory.text(), timeout=30_000)
    assert window.chat_view.composer.send_button.text() == "Send"
    # The chat got its title from the first message and is listed.
    assert window.store.chat(chat_id).title.startswith("Write a Python function")
    assert window.chat_view.chat_list.chat_ids() == [chat_id]
    # Copy puts the whole message on the clipboard.
    window.chat_view.conversation.widgets[answer.id].copy_button.click()
    assert QApplication.clipboard().text() == answer.content


def test_stop_mid_stream_keeps_the_partial_answer(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    window.chat.service.max_tokens = 400
    renders = RenderLog(window)
    send_by_keyboard(qtbot, window, "Tell me a long story about a falcon.")
    assert window.chat_view.composer.send_button.text() == "Stop"
    qtbot.waitUntil(lambda: len(renders.partials()) >= 1, timeout=ANSWER_MS)
    # While it streams, Edit and Regenerate (which would start another answer) are off.
    user_widget, answer_widget = window.chat_view.conversation.widgets.values()
    assert user_widget.edit_button is not None and not user_widget.edit_button.isEnabled()
    assert answer_widget.regenerate_button is not None
    assert not answer_widget.regenerate_button.isEnabled()
    with qtbot.waitSignal(window.chat.answer_finished, timeout=30_000):
        qtbot.mouseClick(window.chat_view.composer.send_button, Qt.MouseButton.LeftButton)
    assert window.chat_view.composer.send_button.text() == "Send"
    answer = window.store.messages(window.chat.current_chat)[-1]  # type: ignore[arg-type]
    assert answer.status == "stopped"
    regenerate = window.chat_view.conversation.widgets[answer.id].regenerate_button
    assert regenerate is not None and regenerate.isEnabled()
    assert answer.content and answer.content.startswith(renders.partials()[0])
    assert window.chat_view.conversation.widgets[answer.id].text == answer.content
    assert window.chat_view.conversation.widgets[answer.id].tag.text() == "stopped"
    # The engine noticed the closed connection and is free again.
    endpoint = window.chat.endpoint()
    assert endpoint is not None
    with EngineClient(endpoint) as client:
        qtbot.waitUntil(lambda: (client.status() or {}).get("state") == "ready", timeout=30_000)


def test_regenerate_replaces_the_last_answer(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    # When answer_finished fires the window is already idle, so the very next
    # click is honoured (it was once ignored while the stream thread wound down).
    busy_at_finish: list[bool] = []
    window.chat.answer_finished.connect(lambda _gid: busy_at_finish.append(window.chat.runner.busy))
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "Name three birds.")
    assert busy_at_finish == [False]
    chat_id = window.chat.current_chat
    assert chat_id is not None
    first_user, first_answer = window.store.messages(chat_id)
    widget = window.chat_view.conversation.widgets[first_answer.id]
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        assert widget.regenerate_button is not None
        widget.regenerate_button.click()
    user, answer = window.store.messages(chat_id)
    assert user.id == first_user.id
    assert answer.id != first_answer.id
    assert answer.status == "complete" and answer.content
    assert list(window.chat_view.conversation.widgets) == [user.id, answer.id]
    assert busy_at_finish == [False, False]


def test_a_full_disk_mid_answer_loses_nothing(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's writes fail as SQLite's do on a full disk (the real SQLITE_FULL
    # path is in test_chat_store.py); here the window's handling is under test.
    full = {"on": False}
    store = window.store
    for name in ("append_delta", "finish_message"):
        real = getattr(store, name)

        def failing(*args: object, _real: Any = real) -> Any:
            if full["on"]:
                raise ChatStoreUnavailable(
                    f"could not save or read chats ({store.path}): the disk is full"
                )
            return _real(*args)

        monkeypatch.setattr(store, name, failing)

    def disk_fills(_gid: int) -> None:
        full["on"] = True

    window.chat.answer_started.connect(disk_fills)
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "Name three birds.")
    chat_id = window.chat.current_chat
    assert chat_id is not None
    assert "could not be saved" in window.error_panel.message.text()
    assert "disk is full" in window.error_panel.message.text()
    _, answer = store.messages(chat_id)
    shown = window.chat_view.conversation.widgets[answer.id].text
    assert shown and answer.content == "" and answer.status == "streaming"
    # Still full: the next message is refused, and stays in the composer.
    send_by_keyboard(qtbot, window, "And three fish?")
    assert "disk is full" in window.error_panel.message.text()
    assert window.chat_view.composer.input.toPlainText() == "And three fish?"
    assert len(store.messages(chat_id)) == 2
    # Space comes back: sending first saves the whole held-back answer.
    full["on"] = False
    window.chat.answer_started.disconnect(disk_fills)
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClick(window.chat_view.composer.input, Qt.Key.Key_Return)
    first_answer = store.message(answer.id)
    assert first_answer.content == shown and first_answer.status == "complete"
    assert [m.role for m in store.messages(chat_id)] == ["user", "assistant", "user", "assistant"]


def test_deleting_the_chat_being_answered_leaves_the_app_usable(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    window.chat.service.max_tokens = 400
    renders = RenderLog(window)
    send_by_keyboard(qtbot, window, "Tell me a long story about a falcon.")
    qtbot.waitUntil(lambda: len(renders.partials()) >= 1, timeout=ANSWER_MS)
    doomed = window.chat.current_chat
    assert doomed is not None
    window.chat.begin_edit(window.store.messages(doomed)[0].id)
    window.chat.delete_chat(doomed)
    assert not window.chat_view.composer.editing
    qtbot.waitUntil(lambda: not window.chat.runner.busy, timeout=30_000)
    assert doomed not in window.chat_view.chat_list.chat_ids()
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "Say hi.")
    chat_id = window.chat.current_chat
    assert chat_id is not None and chat_id != doomed
    user, answer = window.store.messages(chat_id)
    assert user.content == "Say hi." and answer.status == "complete" and answer.content
    assert not window.error_panel.isVisible() or "does not exist" not in (
        window.error_panel.message.text()
    )


def test_sending_redraws_only_what_changed(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "Name a bird.")
    chat_id = window.chat.current_chat
    assert chat_id is not None
    q1, a1 = window.store.messages(chat_id)
    first_question = window.chat_view.conversation.widgets[q1.id]
    assert window.chat_view.conversation.widgets[a1.id].regenerate_button is not None
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "Name a fish.")
    _, a1_, q2, a2 = window.store.messages(chat_id)
    widgets = window.chat_view.conversation.widgets
    assert list(widgets) == [q1.id, a1.id, q2.id, a2.id]
    assert widgets[q1.id] is first_question  # kept, not rebuilt
    # Regenerate moved to the newest answer.
    assert widgets[a1.id].regenerate_button is None
    assert widgets[a2.id].regenerate_button is not None
    assert widgets[a1.id].text == a1_.content and widgets[a2.id].text == a2.content
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        widgets[a2.id].regenerate_button.click()
    *_, q2_, a3 = window.store.messages(chat_id)
    assert q2_.id == q2.id and a3.id != a2.id
    assert list(window.chat_view.conversation.widgets) == [q1.id, a1.id, q2.id, a3.id]
    assert window.chat_view.conversation.widgets[q1.id] is first_question


def test_edit_and_resend(qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog) -> None:
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "What is the capital of France?")
    chat_id = window.chat.current_chat
    assert chat_id is not None
    user, _ = window.store.messages(chat_id)
    window.chat.begin_edit(user.id)
    assert window.chat_view.composer.editing
    assert window.chat_view.composer.input.toPlainText() == "What is the capital of France?"
    window.chat_view.composer.input.clear()
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        send_by_keyboard(qtbot, window, "What is the capital of Italy?")
    messages = window.store.messages(chat_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].id == user.id
    assert messages[0].content == "What is the capital of Italy?"
    assert messages[1].status == "complete" and messages[1].content
    assert not window.chat_view.composer.editing


def test_chats_new_rename_search_delete_without_an_engine(
    qtbot: QtBot, default_model: Path
) -> None:
    w = make_window(qtbot, default_model)
    a = w.chat.new_chat()
    assert w.chat.new_chat() == a  # an empty chat is reused, not duplicated
    w.chat.service.send(a, "about falcons")
    w.chat.service.on_failed(w.chat.service.active.id, "test")  # type: ignore[union-attr]
    b = w.chat.new_chat()
    assert b != a
    w.chat.rename_chat(b, "Recipes")
    assert w.chat_view.header.title.text() == "Recipes"
    w.chat.rename_chat(b, "   ")  # refused, shown, nothing lost
    assert w.error_panel.isVisible() and "empty" in w.error_panel.message.text()
    assert w.store.chat(b).title == "Recipes"
    w.chat_view.chat_list.search.setText("falc")
    assert w.chat_view.chat_list.chat_ids() == [a]
    w.chat_view.chat_list.search.setText("")
    assert set(w.chat_view.chat_list.chat_ids()) == {a, b}
    w.chat.delete_chat(b)
    assert w.chat_view.chat_list.chat_ids() == [a]
    assert w.chat_view.conversation.is_empty
    # Sending before the engine is ready keeps the text and says why.
    w.chat.open_chat(a)
    qtbot.keyClicks(w.chat_view.composer.input, "hello")
    qtbot.keyClick(w.chat_view.composer.input, Qt.Key.Key_Return)
    assert w.chat_view.composer.input.toPlainText() == "hello"
    assert "still starting" in w.error_panel.message.text()
    close_window(qtbot, w)


def test_chat_runs_against_a_remote_openai_compatible_server(
    qtbot: QtBot, default_model: Path, watchdog: GuiWatchdog
) -> None:
    # No local engine at all: the answer can only come from the second server.
    w = make_window(qtbot, default_model)
    watchdog.watch_streams(w.chat.answer_started, w.chat.answer_finished)
    with running_engine("--model", str(default_model)) as remote:
        w.chat.add_remote_endpoint(
            RemoteEndpoint(name="lab", base_url=remote.base_url + "/v1", api_key="wrong")
        )
        w.chat.use_endpoint("lab")
        with qtbot.waitSignal(w.chat.answer_finished, timeout=ANSWER_MS):
            send_by_keyboard(qtbot, w, "Say hi.")
        assert "refused the API key" in w.error_panel.message.text()
        failed = w.store.messages(w.chat.current_chat)[-1]  # type: ignore[arg-type]
        assert failed.status == "error"
        w.chat.add_remote_endpoint(
            RemoteEndpoint(name="lab", base_url=remote.base_url, api_key=remote.key)
        )
        w.chat.use_endpoint("lab")
        assert w.chat_view.header.server_box.currentText() == "lab"
        with qtbot.waitSignal(w.chat.answer_finished, timeout=ANSWER_MS):
            w.chat.regenerate()
        answer = w.store.messages(w.chat.current_chat)[-1]  # type: ignore[arg-type]
        assert answer.status == "complete" and answer.content
        assert answer.meta["model"] == remote.ready["model"]
    assert w.supervisor.pid() is None  # the local engine never ran
    saved = SettingsStore(Paths.from_env().settings_file).load()
    assert saved.active_endpoint == "lab" and saved.endpoint("lab").api_key == remote.key  # type: ignore[union-attr]
    close_window(qtbot, w)


def test_the_view_follows_the_stream_until_the_user_scrolls_up(
    qtbot: QtBot, window: MainWindow, watchdog: GuiWatchdog
) -> None:
    window.resize(1000, 330)  # a short window, so the answer outgrows it
    window.chat.service.max_tokens = 200
    finished: list[int] = []
    window.chat.answer_finished.connect(finished.append)
    bar = window.chat_view.conversation.verticalScrollBar()
    followed: list[bool] = []
    bar.rangeChanged.connect(lambda _lo, hi: followed.append(bar.value() == hi))
    send_by_keyboard(qtbot, window, "Write a long story about a falcon and a fox.")
    # Well past the 24 px that still count as "at the bottom".
    qtbot.waitUntil(lambda: bar.maximum() > 60 and len(followed) >= 3, timeout=ANSWER_MS)
    assert window.chat_view.conversation.following
    qtbot.waitUntil(lambda: bar.value() == bar.maximum(), timeout=10_000)
    bar.setValue(0)  # the user scrolls up to reread
    assert not window.chat_view.conversation.following
    grown = bar.maximum()
    qtbot.waitUntil(lambda: bool(finished), timeout=ANSWER_MS)
    answer = window.store.messages(window.chat.current_chat)[-1]  # type: ignore[arg-type]
    assert len(answer.content) > 0
    assert bar.value() == 0  # left where the user put it
    assert bar.maximum() >= grown


def test_code_blocks_are_highlighted_with_a_copy_link(qtbot: QtBot, tmp_path: Path) -> None:
    from app.qt.chat.conversation import MessageWidget
    from app.qt.markdown_render import MarkdownRenderer

    store = ChatStore(tmp_path / "c.sqlite3")
    chat = store.create_chat("code")
    text = "Here:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n<b>not html</b>"
    message = store.add_message(chat.id, "assistant", text)
    widget = MessageWidget(message, MarkdownRenderer(), last=True)
    qtbot.addWidget(widget)
    html = widget.body.toHtml()
    assert "copy:0" in html and "&lt;b&gt;not html&lt;/b&gt;" in widget._rendered.html
    widget.body.copy_code.emit(0)  # what clicking the block's "Copy" link emits
    assert QApplication.clipboard().text() == "def add(a, b):\n    return a + b"
    store.close()


def test_model_text_never_makes_the_view_load_a_file_or_url(qtbot: QtBot, tmp_path: Path) -> None:
    from app.qt.chat.conversation import MessageWidget
    from app.qt.error_panel import ErrorPanel
    from app.qt.markdown_render import MarkdownRenderer

    # A FIFO nobody writes to: reading it would block the GUI thread forever.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    store = ChatStore(tmp_path / "c.sqlite3")
    chat = store.create_chat("images")
    text = f"![a chart]({fifo}) ![zero](/dev/zero) ![remote](http://127.0.0.1:9/x.png)"
    message = store.add_message(chat.id, "assistant", text)
    # Checked before any widget exists: an <img> would hang the test on the FIFO.
    assert "<img" not in MarkdownRenderer().render(text).html
    widget = MessageWidget(message, MarkdownRenderer(), last=True)
    qtbot.addWidget(widget)
    widget.show()
    qtbot.waitExposed(widget)
    assert "[image: a chart]" in widget.body.toPlainText()
    assert widget.body.loadResource(2, QUrl.fromLocalFile(str(fifo))) is None
    store.close()
    # A server's error text is shown as text, not as HTML (and not at any length).
    panel = ErrorPanel()
    qtbot.addWidget(panel)
    panel.show_error("HTTP 500: <img src='/dev/zero'><h1>big</h1>" + "x" * 5000)
    assert panel.message.textFormat() == Qt.TextFormat.PlainText
    assert panel.message.text().startswith("HTTP 500: <img src='/dev/zero'>")
    assert len(panel.message.text()) <= 600


def test_preset_and_system_prompt_belong_to_each_chat(qtbot: QtBot, default_model: Path) -> None:
    w = make_window(qtbot, default_model, max_tokens=8)
    a = w.chat.new_chat()
    w.chat_view.header.preset_box.setCurrentText("Creative")
    w.chat.set_system_prompt("You are a pirate.")
    w.chat.service.send(a, "hello")
    generation = w.chat.service.active
    assert generation is not None
    assert generation.messages[0] == {"role": "system", "content": "You are a pirate."}
    assert generation.params["temperature"] == PRESETS["Creative"]["temperature"]
    assert generation.params["max_tokens"] == 8
    w.chat.service.on_failed(generation.id, "not sent in this test")
    b = w.chat.new_chat()
    assert w.chat_view.header.preset_box.currentText() == "Balanced"
    assert w.store.chat(b).system_prompt == ""
    w.chat.open_chat(a)
    assert w.chat_view.header.preset_box.currentText() == "Creative"
    close_window(qtbot, w)


class NotPeregrine(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that has neither /v1/engine/status nor /props."""

    def do_GET(self) -> None:
        body = b'{"error": {"message": "not found"}}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_status_bar_describes_the_remote_server_in_use(
    qtbot: QtBot, window: MainWindow, default_model: Path
) -> None:
    bar = window.status
    qtbot.waitUntil(lambda: "4,096" in bar.context.text(), timeout=30_000)
    qtbot.waitUntil(lambda: "MiB" in bar.memory.text(), timeout=30_000)
    local_memory = bar.memory.text()
    # "Add server…" opens a titled dialog wide enough for a whole URL.
    window.chat_view.header.add_server_requested.emit()
    dialog = window.chat.server_dialog
    assert dialog.windowTitle() == "Add a server" and dialog.minimumWidth() >= 560
    with running_engine("--model", str(default_model), "--ctx", "2048") as remote:
        dialog.name.setText("lab")
        dialog.url.setText("ftp://nowhere")
        dialog._accept()
        assert dialog.isVisible() and "http" in dialog.problem.text()
        dialog.url.setText(remote.base_url + "/v1")
        dialog.key.setText(remote.key)
        dialog._accept()
        assert not dialog.isVisible()
        assert window.chat_view.header.server_box.currentText() == "lab"
        # The remote's own figures, never the local engine's.
        assert bar.state.text() == "Server: lab"
        qtbot.waitUntil(lambda: "2,048" in bar.context.text(), timeout=30_000)
        qtbot.waitUntil(lambda: "MiB" in bar.memory.text(), timeout=30_000)
        assert bar.memory.text() != local_memory
        assert not window.chat_view.header.model_box.isVisible()
        # The local engine's events do not overwrite it.
        window.supervisor.state_changed.emit(window.supervisor.state)
        assert bar.state.text() == "Server: lab"
    # A server without Peregrine's status or llama-server's /props: dashes.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotPeregrine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        window.chat.add_remote_endpoint(
            RemoteEndpoint(name="other", base_url=f"http://127.0.0.1:{server.server_port}/v1")
        )
        window.chat.use_endpoint("other")
        assert bar.state.text() == "Server: other"
        assert bar.context.text() == "Context — / —"
        assert bar.memory.text() == "Memory —" and bar.speculative.text() == "Spec —"
        qtbot.wait(500)  # a late answer from the old server must not draw its figures
        assert bar.context.text() == "Context — / —"
    finally:
        server.shutdown()
    # Back to the local engine: its figures again.
    window.chat.use_endpoint(None)
    assert bar.state.text() == "● Engine ready"
    qtbot.waitUntil(lambda: "4,096" in bar.context.text(), timeout=30_000)
    assert window.chat_view.header.model_box.isVisibleTo(window)
