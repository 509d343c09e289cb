"""Takes the docs' screenshots of the real app with the real engine: `python -m app.qt.screenshots DIR`.

Run it under Xvfb (`xvfb-run -s "-screen 0 1400x900x24" python -m app.qt.screenshots
docs/screenshots`) or with QT_QPA_PLATFORM=offscreen. It uses a throwaway
PEREGRINE_HOME, so no real chats or settings are touched.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

PROMPT = "Write a Python function that checks whether a number is prime, with a short explanation."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-tokens", type=int, default=400)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = tempfile.mkdtemp(prefix="peregrine-shots-")
    os.environ["PEREGRINE_HOME"] = home

    # Imported after PEREGRINE_HOME is set, so every path lands in the throwaway home.
    from app.qt.main_window import MainWindow

    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))
    window = MainWindow.on_profile(max_tokens=args.max_tokens)
    store = window.store
    window.resize(1280, 820)
    window.show()
    steps: list[str] = []

    def shot(name: str) -> None:
        window.grab().save(str(args.out / name))
        steps.append(name)

    def on_ready(_ready: object) -> None:
        if steps:
            return
        shot("empty.png")
        chat = window.chat.new_chat()
        window.chat_view.header.preset_box.setCurrentText("Precise")
        window.chat_view.composer.input.setPlainText(PROMPT)
        window.chat.submit(PROMPT)
        assert window.chat.current_chat == chat

    def on_answer(_gid: int) -> None:
        if "chat.png" not in steps:
            QTimer.singleShot(300, after_chat)
        else:
            QTimer.singleShot(300, after_error)

    def after_chat() -> None:
        shot("chat.png")
        # An engine death mid-answer, as the user sees it.
        window.chat.service.max_tokens = 400
        window.chat_view.composer.input.setPlainText("Now write a long story about a falcon.")
        window.chat.submit(window.chat_view.composer.input.toPlainText())
        poll.start()

    def kill_engine_mid_answer() -> None:
        # Once part of the answer is on screen, the engine "crashes".
        active = window.chat.service.active
        if active is None:
            poll.stop()
            return
        if len(store.message(active.assistant_message_id).content) > 200:
            poll.stop()
            pid = window.supervisor.pid()
            if pid:
                os.kill(pid, signal.SIGKILL)

    poll = QTimer()
    poll.setInterval(100)
    poll.timeout.connect(kill_engine_mid_answer)

    def after_error() -> None:
        window.error_panel.log_button.setChecked(True)
        QTimer.singleShot(200, last_shot)

    def last_shot() -> None:
        shot("error.png")
        window.shut_down()

    window.supervisor.ready.connect(on_ready)
    window.chat.answer_finished.connect(on_answer)
    window.closed.connect(app.quit)
    QTimer.singleShot(300_000, window.shut_down)  # never hang a docs build
    window.start_engine()
    app.exec()
    store.close()
    print("wrote", ", ".join(str(args.out / s) for s in steps))
    return 0 if len(steps) == 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
