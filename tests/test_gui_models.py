"""The Models view's Library against the real engine and real GGUF files (pytest-qt, offscreen).

Each library action is driven as a user would: the buttons of the action bar,
the import dialog, a drop on the window. Loads go through /v1/engine/load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from pytestqt.qtbot import QtBot

from app.qt.main_window import MainWindow
from app.qt.navigation import Page
from app.services.engine.client import EngineClient
from app.services.settings import LoadSettings, Settings, SettingsStore
from engine.paths import Paths
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt, pytest.mark.slow]

ENGINE_START_MS = 180_000
LOAD_MS = 180_000
HOSTILE = Path(__file__).parent / "data" / "hostile"


class Badge:
    level = "cpu"
    summary = "CPU only, 8192 tokens, 0.2 GiB"


def fake_fit(_name: str, _header: Any, _size: int) -> Badge:
    return Badge()


class Asked:
    """Stands in for the confirmation dialog: records questions, answers as told."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.questions: list[str] = []

    def __call__(self, title: str, question: str, action: str) -> bool:
        self.questions.append(question)
        return self.answer


def own_copy(model: Path, name: str) -> Path:
    """A second, distinct model file in Peregrine's models folder (a copy of the built-in)."""
    folder = Paths.from_env().ensure().models / "imported"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copyfile(model, target)
    return target


def listed(qtbot: QtBot, w: MainWindow) -> list[Any]:
    """The library after a listing that started now (earlier ones may still be running)."""
    w.models.refresh()
    qtbot.waitUntil(lambda: not w.models.listing, timeout=60_000)
    return list(w.models.entries)


def row_texts(w: MainWindow, path: Path) -> dict[str, str]:
    table = w.models_view.library.model
    row = next(i for i, e in enumerate(table.entries) if e.path == path)
    header = [table.headerData(c, Qt.Orientation.Horizontal) for c in range(table.columnCount())]
    return {header[c]: table.data(table.index(row, c)) for c in range(table.columnCount())}


def test_the_library_lists_every_model_with_its_details_and_fit(
    qtbot: QtBot, default_model: Path, tmp_path: Path
) -> None:
    mine = own_copy(default_model, "Mine.Q4_1.gguf")
    lms = tmp_path / "lmstudio" / "bartowski" / "SmolLM2-GGUF"
    lms.mkdir(parents=True)
    theirs = lms / "SmolLM2-135M-Instruct-Q4_1.gguf"
    shutil.copyfile(default_model, theirs)
    broken = Paths.from_env().models / "Broken.gguf"
    shutil.copyfile(HOSTILE / "text.gguf", broken)
    settings = Settings(library_scan_folders=[f"lmstudio:{tmp_path / 'lmstudio'}"])
    w = make_window(qtbot, default_model, settings=settings, fit=fake_fit)
    entries = listed(qtbot, w)
    assert [e.source for e in entries] == ["builtin", "peregrine", "peregrine", "lmstudio"]
    assert {e.path for e in entries} == {default_model, mine, broken, theirs}
    w.show_page(Page.MODELS)
    row = row_texts(w, theirs)
    assert row["Architecture"] == "llama" and row["Quant"] == "Q4_1"
    assert row["Params"] == "135 M" and row["Context"] == "8 K"
    assert row["Size"].endswith("MB") and row["Fits"] == "CPU" and row["MTP"] == "—"
    assert row["Source"] == "LM Studio"
    assert row_texts(w, default_model)["Source"] == "Built-in"
    assert row_texts(w, broken)["Architecture"] == "unreadable"
    tab = w.models_view.library
    assert "4 models" in tab.summary.text() and "1 from other apps" in tab.summary.text()
    # Other apps' files and the built-in model can never be deleted; ours can.
    for path, deletable in ((theirs, False), (default_model, False), (mine, True)):
        assert tab.select(path)
        assert tab.delete_button.isEnabled() is deletable
        assert tab.load_button.isEnabled()
    assert tab.select(broken)
    assert not tab.load_button.isEnabled() and "Cannot be read" in tab.selected_detail.text()
    assert tab.select(theirs)
    assert "read-only" in tab.selected_detail.text() and Badge.summary in tab.selected_detail.text()
    # The chat's model picker offers every readable model.
    picker = w.chat_view.header.model_box
    offered = [picker.itemData(i) for i in range(picker.count())]
    assert str(mine) in offered and str(theirs) in offered and str(broken) not in offered
    close_window(qtbot, w)


def test_import_by_dialog_and_by_drop_and_a_bad_file_is_refused(
    qtbot: QtBot, default_model: Path, tmp_path: Path
) -> None:
    w = make_window(qtbot, default_model)
    listed(qtbot, w)
    source = tmp_path / "Dialog.Q4_1.gguf"
    shutil.copyfile(default_model, source)
    # Import GGUF… opens a file dialog; choosing the file imports it.
    w.models_view.library.import_button.click()
    with qtbot.waitSignal(w.models.import_finished, timeout=60_000) as done:
        w.models.import_dialog.filesSelected.emit([str(source)])
    imported = done.args[1]
    assert imported is not None and imported.path.read_bytes()[:4] == b"GGUF"
    assert imported.path.parent == Paths.from_env().models / "imported"
    assert source.exists()  # copied, not moved
    # A .gguf dropped anywhere on the window is imported too.
    dropped = tmp_path / "Dropped.Q4_1.gguf"
    shutil.copyfile(default_model, dropped)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(dropped))])
    args = (
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    # The window takes .gguf files only (the drag is refused for anything else).
    text = QMimeData()
    text.setUrls([QUrl.fromLocalFile(str(tmp_path / "notes.txt"))])
    refused = QDragEnterEvent(QPoint(40, 40), Qt.DropAction.CopyAction, text, *args[2:])
    w.dragEnterEvent(refused)
    assert not refused.isAccepted()
    enter = QDragEnterEvent(QPoint(40, 40), *args)
    w.dragEnterEvent(enter)
    assert enter.isAccepted()
    with qtbot.waitSignal(w.models.import_finished, timeout=60_000) as done:
        w.dropEvent(QDropEvent(QPointF(40, 40), *args))
    assert done.args[1] is not None and done.args[1].name == "Dropped.Q4_1.gguf"
    assert w.page is Page.MODELS
    qtbot.waitUntil(lambda: w.models_view.library.select(done.args[1].path), timeout=30_000)
    # Not a GGUF: refused with the reason, and nothing is written.
    bad = tmp_path / "notes.gguf"
    bad.write_text("just text")
    with qtbot.waitSignal(w.models.import_finished, timeout=60_000) as done:
        w.models.import_files([bad])
    assert done.args[1] is None
    assert "notes.gguf was not imported" in w.error_panel.message.text()
    assert not (Paths.from_env().models / "imported" / "notes.gguf").exists()
    assert not list((Paths.from_env().models / "imported").glob(".import-*"))
    close_window(qtbot, w)


def test_delete_asks_first_and_show_file_opens_the_folder(
    qtbot: QtBot, default_model: Path
) -> None:
    mine = own_copy(default_model, "Doomed.Q4_1.gguf")
    asked = Asked(answer=False)
    opened: list[QUrl] = []
    w = make_window(
        qtbot, default_model, confirm=asked, open_url=lambda u: opened.append(u) or True
    )
    listed(qtbot, w)
    tab = w.models_view.library
    assert tab.select(mine)
    tab.show_button.click()
    assert [u.toLocalFile() for u in opened] == [str(mine.parent)]
    tab.delete_button.click()
    assert len(asked.questions) == 1 and "Doomed.Q4_1.gguf" in asked.questions[0]
    assert mine.exists()  # the user said no
    asked.answer = True
    tab.delete_button.click()
    qtbot.waitUntil(lambda: mine not in [e.path for e in w.models.entries], timeout=60_000)
    assert not mine.exists()
    close_window(qtbot, w)


def test_load_switches_models_keeps_the_chat_and_a_failed_load_keeps_the_old_model(
    qtbot: QtBot, default_model: Path, tmp_path: Path
) -> None:
    second = own_copy(default_model, "Second.Q4_1.gguf")
    w = make_window(qtbot, default_model, max_tokens=8)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    with qtbot.waitSignal(w.chat.answer_finished, timeout=LOAD_MS):
        w.chat.submit("Say hi.")
    chat_id = w.chat.current_chat
    assert chat_id is not None
    listed(qtbot, w)
    tab = w.models_view.library
    assert tab.select(default_model) and tab.load_button.text() == "In use"
    assert tab.select(second)
    progress: list[float] = []
    w.engine.load_progress.connect(progress.append)
    with qtbot.waitSignal(w.engine.load_finished, timeout=LOAD_MS):
        tab.load_button.click()
        assert not tab.load_button.isEnabled()  # no second load while one runs
    assert progress and progress[0] == 0.0
    assert w.engine.current == second
    endpoint = w.chat.endpoint()
    assert endpoint is not None
    with EngineClient(endpoint) as client:
        status = client.engine_status()
    assert status is not None and status.model is not None and status.model.path == str(second)
    # The chat is kept, and the next answer comes from the new model.
    assert w.chat.current_chat == chat_id
    assert w.chat_view.header.model_box.currentData() == str(second)
    qtbot.waitUntil(lambda: "Second" in w.status.model.text(), timeout=10_000)
    with qtbot.waitSignal(w.chat.answer_finished, timeout=LOAD_MS):
        w.chat.submit("And again.")
    messages = w.store.messages(chat_id)
    assert len(messages) == 4 and messages[-1].status == "complete"
    saved = SettingsStore(Paths.from_env().settings_file).load()
    assert saved.last_model_path == str(second) and str(second) in saved.model_settings
    # A file the engine refuses: the reason is shown and the model in use serves on.
    refused = tmp_path / "refused.gguf"
    shutil.copyfile(HOSTILE / "huge_tensor_count.gguf", refused)
    with qtbot.waitSignal(w.engine.load_failed, timeout=LOAD_MS) as failed:
        w.engine.load(refused)
    assert failed.args[0] == str(refused) and failed.args[1]
    message = w.error_panel.message.text()
    assert "refused.gguf could not be loaded" in message and "Second.Q4_1 is still in use" in (
        message.replace(".gguf", "")
    )
    assert w.engine.current == second and w.engine.loading is None
    with EngineClient(endpoint) as client:
        status = client.engine_status()
    assert status is not None and status.state == "ready"
    assert status.model is not None and status.model.path == str(second)
    with qtbot.waitSignal(w.chat.answer_finished, timeout=LOAD_MS):
        w.chat.submit("Still there?")
    assert w.store.messages(chat_id)[-1].status == "complete"
    assert SettingsStore(Paths.from_env().settings_file).load().last_model_path == str(second)
    # Unload frees the model; the library says nothing is in use.
    assert tab.select(second) and tab.unload_button.isEnabled()
    with qtbot.waitSignal(w.engine.model_changed, timeout=60_000):
        tab.unload_button.click()
    assert w.engine.current is None
    with EngineClient(endpoint) as client:
        status = client.engine_status()
    assert status is not None and status.state == "idle"
    close_window(qtbot, w)


def test_the_last_model_and_its_settings_come_back_after_a_crash_and_a_restart(
    qtbot: QtBot, default_model: Path
) -> None:
    second = own_copy(default_model, "Kept.Q4_1.gguf")
    settings = Settings(model_settings={str(second): LoadSettings(n_ctx=1024, type_k="q8_0")})
    w = make_window(qtbot, default_model, settings=settings)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        w.start_engine()
    with qtbot.waitSignal(w.engine.load_finished, timeout=LOAD_MS):
        w.engine.load(second)
    first_pid = w.supervisor.pid()
    assert first_pid is not None
    # The engine crashes: the restart brings back the model loaded last, with its settings.
    with qtbot.waitSignal(w.supervisor.died, timeout=60_000):
        os.kill(first_pid, signal.SIGKILL)
    with qtbot.waitSignal(w.supervisor.ready, timeout=ENGINE_START_MS):
        pass
    spec = w.supervisor.spec
    assert spec is not None and spec.model == second
    assert (spec.n_ctx, spec.type_k) == (1024, "q8_0")
    endpoint = w.chat.endpoint()
    assert endpoint is not None
    with EngineClient(endpoint) as client:
        status = client.engine_status()
    assert status is not None and status.settings is not None
    assert status.settings.model == str(second) and status.settings.n_ctx == 1024
    assert status.settings.type_k == "q8_0"
    close_window(qtbot, w)
    on_disk = json.loads(Paths.from_env().settings_file.read_text())
    assert on_disk["last_model_path"] == str(second)
    assert on_disk["model_settings"][str(second)]["n_ctx"] == 1024
    # The next app start: the same model, the same settings.
    again = make_window(qtbot, default_model)
    with qtbot.waitSignal(again.supervisor.ready, timeout=ENGINE_START_MS):
        again.start_engine()
    spec = again.supervisor.spec
    assert spec is not None and spec.model == second and spec.n_ctx == 1024
    assert again.engine.current == second
    close_window(qtbot, again)
