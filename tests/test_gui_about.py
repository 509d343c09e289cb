"""The About box and the app icon (Qt offscreen)."""

from __future__ import annotations

import pytest
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QLabel, QMainWindow
from pytestqt.qtbot import QtBot

from app.qt.about import AboutDialog, add_about_action, app_icon
from app.services.build_info import BuildInfo
from engine.paths import Paths

pytestmark = pytest.mark.qt

INFO = BuildInfo(
    version="1.2.3",
    llama_cpp_python="0.3.36",
    llama_cpp_commit="0c1e57098",
    runtime="built-in CPU runtime, portable x86-64",
    python="CPython 3.11.7",
    bundled=True,
)


def test_about_shows_version_runtime_and_commit(qtbot: QtBot) -> None:
    paths = Paths.from_env()
    dialog = AboutDialog(INFO, paths)
    qtbot.addWidget(dialog)
    texts = [label.text() for label in dialog.findChildren(QLabel)]
    for expected in (
        "1.2.3",
        "built-in CPU runtime, portable x86-64",
        "0c1e57098",
        str(paths.data),
    ):
        assert any(expected in t for t in texts), expected
    dialog.copy_details()
    copied = QGuiApplication.clipboard().text()
    assert "llama.cpp commit: 0c1e57098" in copied and "Version: 1.2.3" in copied


def test_help_menu_opens_about(qtbot: QtBot, monkeypatch: pytest.MonkeyPatch) -> None:
    window = QMainWindow()
    qtbot.addWidget(window)
    shown: list[AboutDialog] = []
    monkeypatch.setattr(AboutDialog, "exec", lambda self: shown.append(self) or 0)
    action = add_about_action(window, Paths.from_env())
    action.trigger()
    assert len(shown) == 1 and shown[0].rows["llama.cpp commit"] == "0c1e57098"


def test_app_icon_has_every_size() -> None:
    icon = app_icon()
    assert not icon.isNull()
    assert {s.width() for s in icon.availableSizes()} >= {16, 32, 48, 256}
