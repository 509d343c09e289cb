"""Takes the docs' screenshots of the real app with the real engine: `python -m app.qt.screenshots DIR`.

Run it under Xvfb (`xvfb-run -s "-screen 0 1400x900x24" python -m app.qt.screenshots
docs/screenshots`) or with QT_QPA_PLATFORM=offscreen. It uses a throwaway
PEREGRINE_HOME (with an imported model and a stand-in LM Studio folder, so the
library has something to show), so no real chats, settings or models are touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

PROMPT = "Write a Python function that checks whether a number is prime, with a short explanation."
SHOTS = (
    "empty.png",
    "chat.png",
    "error.png",
    "models-library.png",
    "settings.png",
    "models-library-light.png",
    "settings-light.png",
    "chat-light.png",
)


def _stock_library(home: Path, model: Path) -> Path:
    """An imported model in Peregrine's folder and one in a stand-in LM Studio folder."""
    own = home / "models" / "imported"
    own.mkdir(parents=True)
    shutil.copyfile(model, own / "SmolLM2-135M-Instruct-copy.Q4_1.gguf")
    lms = home / "lmstudio" / "bartowski" / "SmolLM2-135M-Instruct-GGUF"
    lms.mkdir(parents=True)
    shutil.copyfile(model, lms / "SmolLM2-135M-Instruct-Q4_1.gguf")
    return home / "lmstudio"


class Shots:
    """What every screenshot script shares: grab the window into `out`, schedule
    the next step, and run the app until the last step shuts it down."""

    def __init__(self, window: Any, out: Path) -> None:
        self.window = window
        self.out = out
        self.steps: list[str] = []

    def shot(self, name: str) -> None:
        self.window.grab().save(str(self.out / name))
        self.steps.append(name)

    @staticmethod
    def later(ms: int, fn: object) -> None:
        QTimer.singleShot(ms, fn)  # type: ignore[call-overload]

    def run(self, app: QApplication, timeout_ms: int) -> None:
        """Starts the engine and runs the app until a step (or the timeout) shuts it down."""
        self.window.closed.connect(app.quit)
        QTimer.singleShot(timeout_ms, self.window.shut_down)  # never hang a docs build
        self.window.start_engine()
        app.exec()

    def report(self, expected: Sequence[str]) -> int:
        print("wrote", ", ".join(str(self.out / s) for s in self.steps))
        return 0 if len(self.steps) == len(expected) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-tokens", type=int, default=400)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="peregrine-shots-"))
    os.environ["PEREGRINE_HOME"] = str(home)

    # Imported after PEREGRINE_HOME is set, so every path lands in the throwaway home.
    from app.qt.main_window import MainWindow
    from app.qt.navigation import Page
    from app.services.engine.launch import SupervisorState
    from app.services.settings import Settings, SettingsStore
    from engine.default_model import default_model_path
    from engine.paths import Paths

    lms = _stock_library(home, default_model_path())
    paths = Paths.from_env().ensure()
    SettingsStore(paths.settings_file).save(
        Settings(theme="dark", library_scan_folders=[f"lmstudio:{lms}"])
    )

    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))
    window = MainWindow.on_profile(max_tokens=args.max_tokens)
    store = window.store
    window.resize(1280, 820)
    window.show()
    shots = Shots(window, args.out)
    steps, shot, later = shots.steps, shots.shot, shots.later

    def on_ready(_ready: object) -> None:
        if not steps:
            later(1000, first_chat)  # the status bar's figures arrive first

    def first_chat() -> None:
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
            later(300, after_chat)
        else:
            later(300, after_error)

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
        later(200, error_shot)

    def error_shot() -> None:
        shot("error.png")
        window.error_panel.clear()
        if window.supervisor.state is not SupervisorState.READY:
            window.supervisor.ready.connect(lambda _r: later(800, library_shots))
        else:
            library_shots()

    def library_shots() -> None:
        if "models-library.png" in steps:
            return
        window.show_page(Page.MODELS)
        window.models.entries_changed.connect(lambda _e: later(300, library_ready))
        window.models.refresh()

    def library_ready() -> None:
        if "models-library.png" in steps:
            return
        window.models_view.library.select(window.engine.current or home)
        later(200, dark_shots)

    def tall_settings() -> None:
        # Every section at once: the page is taller than the usual window.
        window.show_page(Page.SETTINGS)
        window.resize(1280, 1300)

    def dark_shots() -> None:
        shot("models-library.png")
        tall_settings()
        later(300, settings_dark)

    def settings_dark() -> None:
        shot("settings.png")
        window.resize(1280, 820)
        window.settings.set_theme("light")
        window.show_page(Page.MODELS)
        later(300, light_shots)

    def light_shots() -> None:
        shot("models-library-light.png")
        tall_settings()
        later(300, settings_light)

    def settings_light() -> None:
        shot("settings-light.png")
        window.resize(1280, 820)
        window.show_page(Page.CHAT)
        later(300, chat_light)

    def chat_light() -> None:
        shot("chat-light.png")
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
