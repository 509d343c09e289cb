"""The app's main window for GUI tests: built on the isolated profile, shut down cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytestqt.qtbot import QtBot

from app.qt.engine_supervisor import EngineSupervisor
from app.qt.main_window import MainWindow
from app.services.chat.store import ChatStore
from app.services.settings import Settings, SettingsStore
from engine.paths import Paths


def make_window(
    qtbot: QtBot,
    model: Path,
    settings: Settings | None = None,
    max_tokens: int = 24,
    **extra: Any,
) -> MainWindow:
    """The window; `extra` passes MainWindow's keyword-only dependencies (fit, confirm, open_url)."""
    paths = Paths.from_env().ensure()
    window = MainWindow(
        ChatStore(paths.chats_db),
        SettingsStore(paths.settings_file),
        EngineSupervisor(stall_timeout_s=120),
        lambda: model,
        settings=settings,
        max_tokens=max_tokens,
        paths=paths,
        **extra,
    )
    # pytest-qt closes and deletes registered widgets before fixture teardown, so the
    # asynchronous shutdown (engine stopped, then `closed`) runs in before_close_func.
    qtbot.addWidget(window, before_close_func=lambda w: close_window(qtbot, w))
    window.show()
    return window


def close_window(qtbot: QtBot, window: MainWindow) -> None:
    """Quits as the user would and waits until the engine is gone; safe to call twice."""
    if not window._closed:
        with qtbot.waitSignal(window.closed, timeout=30_000):
            window.shut_down()
        window.store.close()
    assert window.supervisor.pid() is None
