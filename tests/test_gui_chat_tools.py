"""Tool calls in the chat window: the tools editor, a call's block, its result, the answer.

The real engine and the built-in model (pytest-qt, offscreen): a named
tool_choice makes the engine call, and its grammar holds the arguments to the
tool's schema, so even the 135M model's call is checked with `jsonschema`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from app.qt import theme
from app.qt.chat.conversation import DETAILS_MAX_HEIGHT, MessageWidget, ToolState
from app.qt.main_window import MainWindow
from app.qt.markdown_render import MarkdownRenderer
from app.services.chat.store import Message
from tests.gui_watchdog import GuiWatchdog
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt]

ENGINE_START_MS = 180_000
ANSWER_MS = 180_000

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
RESULT = '{"forecast": "sunny", "high_c": 24}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": WEATHER,
        },
    }
]


@pytest.fixture
def window(qtbot: QtBot, default_model: Path) -> Iterator[MainWindow]:
    dog = GuiWatchdog(limit_s=1.0).start()
    w = make_window(qtbot, default_model)
    dog.watch_streams(w.chat.answer_started, w.chat.answer_finished)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    yield w
    close_window(qtbot, w)
    dog.stop()
    dog.check()


def choose(dialog: Any, value: str) -> None:
    index = dialog.choice.findData(value)
    assert index >= 0, f"no choice {value}"
    dialog.choice.setCurrentIndex(index)


@pytest.mark.slow
def test_a_forced_call_is_shown_answered_by_the_user_and_the_answer_goes_on(
    qtbot: QtBot, window: MainWindow
) -> None:
    window.chat.service.max_tokens = 96
    chat_id = window.chat.new_chat()
    header = window.chat_view.header
    assert header.tools_button.text() == "Tools…"
    qtbot.mouseClick(header.tools_button, Qt.MouseButton.LeftButton)
    dialog = window.chat.tools_dialog
    qtbot.waitUntil(dialog.isVisible)
    dialog.edit.setPlainText(json.dumps(TOOLS, indent=2))
    dialog.enabled.setChecked(True)
    choose(dialog, "function:get_weather")  # offered once the JSON names the tool
    qtbot.mouseClick(dialog.save_button, Qt.MouseButton.LeftButton)
    assert not dialog.isVisible()
    assert header.tools_button.text() == "Tools (1)"
    assert window.store.chat(chat_id).tool_choice == "function:get_weather"

    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClicks(window.chat_view.composer.input, "What is the weather in Paris?")
        qtbot.keyClick(window.chat_view.composer.input, Qt.Key.Key_Return)
    user, answer = window.store.messages(chat_id)
    assert user.content == "What is the weather in Paris?"
    assert answer.status == "complete", answer.meta
    assert answer.meta["finish_reason"] == "tool_calls"
    (call,) = answer.tool_calls
    assert call["function"]["name"] == "get_weather" and call["id"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER)

    # The call is a collapsed block: tool name and a short summary of its arguments.
    widget = window.chat_view.conversation.widgets[answer.id]
    (block,) = widget.call_blocks
    qtbot.waitUntil(block.isVisible)  # a widget added to a shown layout is shown queued
    assert not block.expanded and block.details.isHidden()
    assert "get_weather" in block.header.full_text()
    assert f'city: "{arguments["city"]}"' in block.header.full_text()
    assert widget.body.isHidden() == (not answer.content)
    # The keyboard opens it: Space on the focused header.
    block.header.setFocus()
    qtbot.keyClick(block.header, Qt.Key.Key_Space)
    assert block.expanded and block.details.isVisible()
    assert json.loads(block.details.toPlainText()) == arguments
    assert "\n  " in block.details.toPlainText()  # pretty-printed

    # The app runs no tools: the user types the result and sends it.
    assert block.result_input is not None and block.send_button is not None
    assert "waiting" in block.state.text()
    qtbot.keyClicks(block.result_input, RESULT)
    with qtbot.waitSignal(window.chat.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClick(block.result_input, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
        continuation = window.chat.service.active
    # What went to the engine: the call and its result in OpenAI's shape, and the
    # named choice relaxed to auto, so the model answers instead of calling again.
    assert continuation is not None
    assert continuation.messages[-2:] == [
        {"role": "assistant", "content": answer.content or None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": RESULT},
    ]
    assert continuation.params["tools"] == TOOLS
    assert continuation.params["tool_choice"] == "auto"
    messages = window.store.messages(chat_id)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    result, final = messages[2], messages[3]
    assert result.tool_call_id == call["id"]
    assert result.content == RESULT
    assert final.status == "complete", final.meta
    assert final.content or final.tool_calls
    # The engine took the history in OpenAI's shape (it would have refused it, 400).
    assert "error" not in final.meta

    widgets = window.chat_view.conversation.widgets
    assert list(widgets) == [m.id for m in messages]
    # The call block was redrawn without its result box, still open as the user left it.
    (block,) = widgets[answer.id].call_blocks
    assert block.result_input is None and block.expanded
    assert "answered" in block.state.text()
    # The result is a collapsed block of its own that opens.
    result_block = widgets[result.id].result_block
    assert result_block is not None and not result_block.expanded
    assert "Result of get_weather" in result_block.header.full_text()
    assert "sunny" in result_block.header.full_text()
    qtbot.mouseClick(result_block.header, Qt.MouseButton.LeftButton)
    assert result_block.expanded and json.loads(result_block.details.toPlainText()) == {
        "forecast": "sunny",
        "high_c": 24,
    }
    # The same chat opened again (as after a restart) draws the same blocks.
    window.chat.open_chat(chat_id)
    again = window.chat_view.conversation.widgets
    assert len(again[answer.id].call_blocks) == 1 and again[result.id].result_block is not None


def test_bad_tools_are_refused_in_the_editor_and_nothing_is_lost(
    qtbot: QtBot, default_model: Path
) -> None:
    w = make_window(qtbot, default_model)
    chat_id = w.chat.new_chat()
    w.chat.set_tools(json.dumps(TOOLS), True, "auto")
    w.chat_view.header.tools_button.click()
    dialog = w.chat.tools_dialog
    bad = json.dumps(TOOLS)[:-2]
    dialog.edit.setPlainText(bad)
    assert "not valid JSON" in dialog.problem.text()  # said as it is typed
    qtbot.mouseClick(dialog.save_button, Qt.MouseButton.LeftButton)
    assert dialog.isVisible()
    assert "not valid JSON" in dialog.problem.text() and "line 1" in dialog.problem.text()
    assert dialog.edit.toPlainText() == bad
    assert w.store.chat(chat_id).tools == json.dumps(TOOLS)  # the saved tools stay
    # A schema that is not a JSON Schema, named by tool and place.
    broken = [
        {**TOOLS[0], "function": {"name": "f", "parameters": {"type": "object", "required": 3}}}
    ]
    dialog.edit.setPlainText(json.dumps(broken))
    dialog.save()
    assert dialog.isVisible() and "Tool 1 (f)" in dialog.problem.text()
    # Fixed, formatted and saved.
    dialog.edit.setPlainText(json.dumps(TOOLS))
    dialog.format_button.click()
    assert dialog.edit.toPlainText() == json.dumps(TOOLS, indent=2)
    assert "1 tool: get_weather" in dialog.problem.text()
    choose(dialog, "required")
    dialog.enabled.setChecked(False)
    dialog.save()
    assert not dialog.isVisible()
    chat = w.store.chat(chat_id)
    assert (chat.tools_enabled, chat.tool_choice) == (False, "required")
    assert w.chat_view.header.tools_button.text() == "Tools…"
    # Off: the next request carries no tools.
    generation = w.chat.service.send(chat_id, "hi")
    assert "tools" not in generation.params and "tool_choice" not in generation.params
    w.chat.service.on_failed(generation.id, "not sent in this test")
    close_window(qtbot, w)


def test_long_arguments_scroll_inside_their_block(qtbot: QtBot) -> None:
    arguments = json.dumps({"rows": [{"n": i, "text": "x" * 300} for i in range(60)]})
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = Message(1, 1, "assistant", "", "complete", 0.0, tool_calls=[call])
    state = ToolState.of([message])
    state.expanded.add("call:call_1")
    widget = MessageWidget(message, MarkdownRenderer(theme.LIGHT), True, state)
    qtbot.addWidget(widget)
    widget.resize(380, 400)
    widget.show()
    (block,) = widget.call_blocks
    assert block.expanded
    assert block.details.height() <= DETAILS_MAX_HEIGHT
    assert block.details.verticalScrollBar().maximum() > 0
    assert block.details.horizontalScrollBar().maximum() > 0
    assert widget.width() <= 380
    # The header's summary stays one short line however long the arguments are.
    assert len(block.header.full_text()) < 120
