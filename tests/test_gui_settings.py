"""The Settings view against the real engine (pytest-qt, offscreen): token, local API, theme."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
from pathlib import Path

import anthropic
import openai
import psutil
import pytest
from PySide6.QtWidgets import QAbstractButton, QApplication, QLabel, QLineEdit
from pytestqt.qtbot import QtBot

from app.qt.main_window import MainWindow
from app.qt.navigation import Page
from app.services.settings import SettingsStore
from engine.paths import Paths
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt]

ENGINE_START_MS = 180_000
TOKEN = "hf_" + "Zq7T" * 9  # 39 characters, like a real token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shown_texts(w: MainWindow) -> list[str]:
    """Every text a widget of the window holds or shows."""
    texts = [label.text() for label in w.findChildren(QLabel)]
    texts += [edit.text() for edit in w.findChildren(QLineEdit)]
    texts += [button.text() for button in w.findChildren(QAbstractButton)]
    return texts


def test_the_hf_token_is_kept_0600_never_logged_and_never_shown_whole(
    qtbot: QtBot, default_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    w = make_window(qtbot, default_model)
    w.show_page(Page.SETTINGS)
    view = w.settings_view
    assert view.token_state.text() == "Not set"
    view.token_input.setText("has a space")
    view.token_save.click()
    assert "does not look like a token" in view.token_problem.text()
    view.token_input.setText(TOKEN)
    view.token_save.click()
    path = Paths.from_env().settings_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SettingsStore(path).load().token == TOKEN
    # Shown masked; the input is emptied; no widget anywhere holds the whole token.
    assert view.token_state.text() == "Saved: hf_…Zq7T"
    assert view.token_input.text() == ""
    assert not [t for t in shown_texts(w) if TOKEN in t]
    # A reopened window shows it masked too; nothing logged it.
    close_window(qtbot, w)
    again = make_window(qtbot, default_model)
    assert again.settings_view.token_state.text() == "Saved: hf_…Zq7T"
    assert not [t for t in shown_texts(again) if TOKEN in t]
    again.settings_view.token_remove.click()
    assert SettingsStore(path).load().token is None
    close_window(qtbot, again)
    assert TOKEN not in caplog.text
    assert "hf_…Zq7T" not in caplog.text or TOKEN not in caplog.text


@pytest.mark.slow
def test_the_api_key_from_settings_reaches_the_engine_and_survives_restarts(
    qtbot: QtBot, default_model: Path
) -> None:
    port = free_port()
    w = make_window(qtbot, default_model)
    view = w.settings_view
    # Not shared yet: nothing to copy.
    assert not view.copy_key.isEnabled()
    view.api_shared.setChecked(True)
    view.api_port.setText(str(port))
    assert view.api_apply.isEnabled()
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS) as ready:
        view.api_apply.click()  # applying (re)starts the engine with the new port and key
    key = SettingsStore(Paths.from_env().settings_file).load().local_api.api_key
    secret = key.get_secret_value()
    assert len(secret) > 30
    assert ready.args[0].port == port and ready.args[0].api_key == secret
    pid = w.supervisor.pid()
    assert pid is not None
    engine = psutil.Process(pid)
    assert not [arg for arg in engine.cmdline() if secret in arg]
    assert engine.environ().get("PEREGRINE_API_KEY") == secret
    # Another tool uses the official client with what the copy buttons give.
    view.copy_url.click()
    base_url = QApplication.clipboard().text()
    assert base_url == f"http://127.0.0.1:{port}/v1"
    view.copy_key.click()
    assert QApplication.clipboard().text() == secret
    view.copy_example.click()
    assert QApplication.clipboard().text() == (
        f'client = OpenAI(base_url="{base_url}", api_key="{secret}")'
    )
    assert secret not in view.api_key.text() and secret not in view.api_example.text()
    # The agent-framework example is real Python with the real URL and key.
    view.copy_agent.click()
    agent = QApplication.clipboard().text()
    compile(agent, "agent_example", "exec")
    assert f'AsyncOpenAI(base_url="{base_url}", api_key="{secret}")' in agent
    assert "@function_tool" in agent and secret not in view.agent_example.text()
    # The Claude Code line reaches the Messages API with its own client.
    view.copy_anthropic.click()
    env = dict(part.split("=", 1) for part in QApplication.clipboard().text().split()[:2])
    assert env["ANTHROPIC_API_KEY"] == secret and secret not in view.anthropic_example.text()
    claude = anthropic.Anthropic(
        base_url=env["ANTHROPIC_BASE_URL"], api_key=env["ANTHROPIC_API_KEY"], max_retries=0
    )
    counted = claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens > 0
    client = openai.OpenAI(base_url=base_url, api_key=secret, max_retries=0)
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    # After a crash the engine comes back on the same port with the same key.
    with qtbot.waitSignal(w.supervisor.died, timeout=60_000):
        os.kill(pid, signal.SIGKILL)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS) as ready:
        pass
    assert (ready.args[0].port, ready.args[0].api_key) == (port, secret)
    assert client.models.list().data
    close_window(qtbot, w)
    # And after the app restarts.
    again = make_window(qtbot, default_model)
    with qtbot.waitSignal(again.supervisor.ready, timeout=ENGINE_START_MS) as ready:
        again.start_engine()
    assert (ready.args[0].port, ready.args[0].api_key) == (port, secret)
    assert client.models.list().data
    # A new key takes effect at once (the engine restarts with it).
    with qtbot.waitSignal(again.supervisor.ready, timeout=ENGINE_START_MS) as ready:
        again.settings_view.new_key.click()
    assert ready.args[0].port == port and ready.args[0].api_key != secret
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    close_window(qtbot, again)


def test_theme_engine_defaults_and_folders_are_saved(
    qtbot: QtBot, default_model: Path, tmp_path: Path
) -> None:
    w = make_window(qtbot, default_model)
    view = w.settings_view
    view.theme_box.setCurrentText("Light")
    assert "#f6f7f9" in w.styleSheet()
    view.theme_box.setCurrentText("Dark")
    assert "#16181d" in w.styleSheet()
    view.threads.setText("3")
    view.threads.editingFinished.emit()
    view.speculation.setChecked(False)
    view.models_folder.setText("relative/path")
    view.models_folder.editingFinished.emit()
    assert "full path" in view.models_folder_problem.text()
    elsewhere = tmp_path / "disk" / "models"
    with qtbot.waitSignal(w.models.entries_changed, timeout=60_000):
        view.models_folder.setText(str(elsewhere))
        view.models_folder.editingFinished.emit()
    assert elsewhere.is_dir()
    assert w.models.library().models_dir == elsewhere
    view.default_scan.setChecked(False)
    view.add_scan_folder(str(tmp_path / "gguf"))
    saved = SettingsStore(Paths.from_env().settings_file).load()
    assert saved.theme == "dark"
    assert (saved.engine.threads, saved.engine.speculation) == (3, False)
    assert saved.models_folder == str(elsewhere)
    assert saved.library_scan_folders is not None
    assert saved.library_scan_folders[-1] == str(tmp_path / "gguf")
    close_window(qtbot, w)
