"""Screenshots of tool calls in the chat: `python -m tests.shots_chat_tools DIR`.

Run under Xvfb (`xvfb-run -s "-screen 0 1400x900x24" python -m tests.shots_chat_tools
docs/screenshots`). The real app and engine with the built-in model, in a
throwaway PEREGRINE_HOME: the Tools editor, a call forced with a named
tool_choice waiting for its result, and the answer after the result, dark and light.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

from app.qt.screenshots import Shots

SHOTS = ("chat-tools-editor.png", "chat-tool-call.png", "chat-tools.png", "chat-tools-light.png")
SYSTEM = "You are a helpful assistant. Answer in plain sentences."
PROMPT = "What will the weather be in Paris for the next 3 days?"
RESULT = '{"city": "Paris", "forecast": "sunny, then showers on day 3", "high_c": 24}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string"}},
                "required": ["zone"],
            },
        },
    },
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="peregrine-shots-"))
    os.environ["PEREGRINE_HOME"] = str(home)

    from app.qt.main_window import MainWindow
    from app.services.settings import Settings, SettingsStore
    from engine.paths import Paths

    paths = Paths.from_env().ensure()
    SettingsStore(paths.settings_file).save(Settings(theme="dark"))
    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))
    window = MainWindow.on_profile(max_tokens=160)
    store = window.store
    window.resize(1280, 820)
    window.show()
    shots = Shots(window, args.out)
    steps, shot, later = shots.steps, shots.shot, shots.later

    def on_ready(_ready: object) -> None:
        if not steps:
            later(1000, editor)

    def editor() -> None:
        if steps:
            return
        window.chat.new_chat()
        window.chat_view.header.preset_box.setCurrentText("Precise")
        window.chat.set_system_prompt(SYSTEM)
        window.chat_view.header.tools_button.click()
        dialog = window.chat.tools_dialog
        dialog.edit.setPlainText(json.dumps(TOOLS, indent=2))
        dialog.enabled.setChecked(True)
        dialog.choice.setCurrentIndex(dialog.choice.findData("function:get_weather"))
        dialog.resize(720, 620)
        later(300, editor_shot)

    def editor_shot() -> None:
        dialog = window.chat.tools_dialog
        dialog.grab().save(str(args.out / "chat-tools-editor.png"))
        steps.append("chat-tools-editor.png")
        dialog.save()
        window.chat_view.composer.input.setPlainText(PROMPT)
        window.chat.submit(PROMPT)

    def on_answer(_gid: int) -> None:
        later(300, after_call if "chat-tool-call.png" not in steps else after_result)

    def after_call() -> None:
        chat_id = window.chat.current_chat
        assert chat_id is not None
        answer = store.messages(chat_id)[-1]
        (block,) = window.chat_view.conversation.widgets[answer.id].call_blocks
        block.header.setChecked(True)
        assert block.result_input is not None
        block.result_input.setPlainText(RESULT)
        block.result_input.setFocus()
        later(300, lambda: call_shot(block))

    def call_shot(block: object) -> None:
        shot("chat-tool-call.png")
        send = getattr(block, "send_button", None)
        assert send is not None
        send.click()

    def after_result() -> None:
        chat_id = window.chat.current_chat
        assert chat_id is not None
        result = next(m for m in store.messages(chat_id) if m.role == "tool")
        block = window.chat_view.conversation.widgets[result.id].result_block
        assert block is not None
        block.header.setChecked(True)
        later(300, result_shots)

    def result_shots() -> None:
        shot("chat-tools.png")
        window.settings.set_theme("light")
        later(300, light_shot)

    def light_shot() -> None:
        shot("chat-tools-light.png")
        window.settings.set_theme("dark")
        window.shut_down()

    window.supervisor.ready.connect(on_ready)
    window.chat.answer_finished.connect(on_answer)
    shots.run(app, timeout_ms=400_000)
    store.close()
    shutil.rmtree(home, ignore_errors=True)
    return shots.report(SHOTS)


if __name__ == "__main__":
    raise SystemExit(main())
