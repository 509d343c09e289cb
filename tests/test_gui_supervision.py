"""Engine supervision: crashes mid-answer, start failures, and quitting by signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from app.services.settings import Settings, SettingsStore
from engine.paths import Paths
from tests.gui_watchdog import GuiWatchdog
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt, pytest.mark.slow]

ENGINE_START_MS = 180_000
ANSWER_MS = 180_000


@pytest.fixture
def watchdog() -> Iterator[GuiWatchdog]:
    dog = GuiWatchdog(limit_s=1.0).start()
    yield dog
    dog.stop()
    print(f"\nworst GUI event-loop lag while streaming: {dog.worst_lag_s * 1000:.1f} ms")
    dog.check()


def test_engine_killed_mid_answer_is_restarted_and_the_chat_survives(
    qtbot: QtBot, default_model: Path, watchdog: GuiWatchdog
) -> None:
    w = make_window(qtbot, default_model, max_tokens=400)
    watchdog.watch_streams(w.chat.answer_started, w.chat.answer_finished)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    first_pid = w.supervisor.pid()
    assert first_pid is not None
    qtbot.keyClicks(w.chat_view.composer.input, "Write a long poem about the sea.")
    qtbot.keyClick(w.chat_view.composer.input, Qt.Key.Key_Return)
    chat_id = w.chat.current_chat
    assert chat_id is not None
    answer_id = w.store.messages(chat_id)[-1].id
    qtbot.waitUntil(lambda: len(w.store.message(answer_id).content) > 0, timeout=ANSWER_MS)
    with (
        qtbot.waitSignal(w.chat.answer_finished, timeout=60_000),
        qtbot.waitSignal(w.supervisor.died, timeout=60_000),
    ):
        os.kill(first_pid, signal.SIGKILL)
    # Said in plain words, with the engine's log one click away.
    assert w.error_panel.isVisible()
    assert "stopped unexpectedly" in w.error_panel.message.text()
    assert "chat is saved" in w.error_panel.message.text()
    assert w.error_panel.log_button.isVisible()
    w.error_panel.log_button.click()
    assert "[peregrine] engine exited" in w.error_panel.log.toPlainText()
    # The partial answer is kept, marked, and shown.
    partial = w.store.message(answer_id)
    assert partial.status == "interrupted" and partial.content
    assert w.chat_view.conversation.widgets[answer_id].text == partial.content
    assert w.chat_view.composer.send_button.text() == "Send"
    # The engine comes back by itself, with the same model.
    if w.supervisor.state != "ready":
        with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
            pass
    assert w.supervisor.pid() not in (None, first_pid)
    assert w.supervisor.spec is not None and w.supervisor.spec.model == default_model
    assert "running again" in w.error_panel.message.text()
    # And the next message works, with the interrupted answer still in the chat.
    w.chat.service.max_tokens = 16
    with qtbot.waitSignal(w.chat.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClicks(w.chat_view.composer.input, "Thanks. Now say hi.")
        qtbot.keyClick(w.chat_view.composer.input, Qt.Key.Key_Return)
    messages = w.store.messages(chat_id)
    assert [m.status for m in messages] == ["complete", "interrupted", "complete", "complete"]
    assert messages[1].content == partial.content
    assert messages[3].content
    close_window(qtbot, w)
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"


def test_an_engine_that_cannot_start_is_explained_with_its_log(
    qtbot: QtBot, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    w = make_window(qtbot, bad)
    with qtbot.waitSignal(w.supervisor.failed, timeout=ENGINE_START_MS):
        w.start_engine()
    assert w.error_panel.isVisible()
    assert w.error_panel.message.text().startswith("The engine could not run:")
    assert w.error_panel.log_button.isVisible()
    assert w.supervisor.pid() is None
    assert w.supervisor.state == "failed"
    # A failed start never becomes the remembered model.
    assert SettingsStore(Paths.from_env().settings_file).load().last_model_path is None
    # Enter now keeps saying what is wrong, not "still starting"; the text stays.
    qtbot.keyClicks(w.chat_view.composer.input, "hello")
    qtbot.keyClick(w.chat_view.composer.input, Qt.Key.Key_Return)
    assert w.chat_view.composer.input.toPlainText() == "hello"
    assert w.error_panel.message.text().startswith("The engine could not run:")
    assert "not sent" in w.error_panel.message.text()
    assert w.error_panel.log_button.isVisible()
    close_window(qtbot, w)


def test_a_missing_last_model_falls_back_to_the_built_in_one(
    qtbot: QtBot, default_model: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "deleted.gguf"
    w = make_window(qtbot, default_model, settings=Settings(last_model_path=str(gone)))
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    assert "missing" in w.error_panel.message.text()
    assert w.supervisor.spec is not None and w.supervisor.spec.model == default_model
    saved = SettingsStore(Paths.from_env().settings_file).load()
    assert saved.last_model_path == str(default_model)
    close_window(qtbot, w)


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGKILL, -signal.SIGKILL)],
)
def test_a_signal_quits_the_app_and_stops_the_engine(signum: int, exit_code: int) -> None:
    """SIGTERM and SIGINT quit cleanly; after SIGKILL, --parent-pid takes the engine down."""
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    app = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "--debug", "gui"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    # If anything hangs, kill the app so the test fails instead of waiting forever.
    guard = threading.Timer(240, app.kill)
    guard.start()
    try:
        engine_pid: int | None = None
        assert app.stderr is not None
        for line in app.stderr:  # blocks until the next log line: no polling
            if "engine started (pid " in line:
                engine_pid = int(line.split("engine started (pid ")[1].split(")")[0])
            if "engine ready on" in line:
                break
        assert engine_pid is not None, "the app never reported its engine"
        engine = psutil.Process(engine_pid)
        assert "serve" in engine.cmdline()
        app.send_signal(signum)
        threading.Thread(target=lambda: [None for _ in app.stderr or []], daemon=True).start()
        assert app.wait(60) == exit_code
        _gone, alive = psutil.wait_procs([engine], timeout=30)
        assert not alive, "the engine outlived the app"
    finally:
        guard.cancel()
        if app.poll() is None:
            app.kill()
            app.wait()


FAKE_ENGINE = """#!/bin/sh
# Stands in for `python -m app.cli serve`: ready at once, exits 0 on SIGTERM.
echo $$ >> "{pids}"
trap 'exit 0' TERM
echo '{{"event": "ready", "host": "127.0.0.1", "port": 9, "api_key": "k", "model": "fake"}}'
i=0
while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"""


def test_stopping_while_the_ready_line_is_unread_is_not_taken_for_a_crash(
    qtbot: QtBot, tmp_path: Path
) -> None:
    from app.qt.engine_supervisor import EngineSupervisor
    from app.services.engine.launch import LaunchSpec

    pids = tmp_path / "pids"
    fake = tmp_path / "fake-engine"
    fake.write_text(FAKE_ENGINE.format(pids=pids))
    fake.chmod(0o755)
    supervisor = EngineSupervisor(python=str(fake))
    states: list[str] = []
    supervisor.state_changed.connect(states.append)
    supervisor.start(LaunchSpec(model=tmp_path / "m.gguf"))
    # The engine prints "ready" while the GUI thread is busy elsewhere (no events
    # processed), and the user closes the window before that line is read.
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    with qtbot.waitSignal(supervisor.stopped, timeout=15_000):
        supervisor.stop()
    qtbot.wait(300)  # a wrongly scheduled restart would start here
    assert states == ["starting", "stopping", "stopped"], states
    assert supervisor.state == "stopped" and supervisor.pid() is None
    assert len(pids.read_text().split()) == 1  # never relaunched
