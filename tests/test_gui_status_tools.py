"""The status bar's tool-call mark: the model's format, and its self-test pending, passed or failed."""

from __future__ import annotations

from pytestqt.qtbot import QtBot

from app.qt.status_bar import StatusBar
from app.services.engine.client import ServerFigures


def test_the_tool_self_test_shows_in_the_status_bar(qtbot: QtBot) -> None:
    bar = StatusBar()
    qtbot.addWidget(bar)
    assert bar.tools.text() == "Tools —"
    bar.set_figures(ServerFigures(n_ctx=2048, tool_format="hermes"))
    assert bar.tools.text() == "Tools hermes …"
    bar.set_figures(ServerFigures(n_ctx=2048, tool_format="hermes", tool_self_test=True))
    assert bar.tools.text() == "Tools hermes ✓"
    bar.set_figures(
        ServerFigures(
            tool_format="llama3", tool_self_test=False, tool_detail="no call parsed: 'Hi'"
        )
    )
    assert bar.tools.text() == "Tools llama3 ✗"
    assert "no call parsed" in bar.tools.toolTip()
    bar.reset()
    assert bar.tools.text() == "Tools —"
