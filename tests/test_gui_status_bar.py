"""The status bar names the draft model in use and how many of its drafts were accepted."""

from __future__ import annotations

from pytestqt.qtbot import QtBot

from app.qt.status_bar import StatusBar
from app.services.engine.client import ServerFigures


def test_the_draft_model_and_its_acceptance_show_in_the_status_bar(qtbot: QtBot) -> None:
    bar = StatusBar()
    qtbot.addWidget(bar)
    bar.set_figures(
        ServerFigures(
            n_ctx=4096,
            drafter="ngram+draft",
            acceptance=0.5,
            draft_model="SmolLM2-135M-Instruct.Q4_1",
            draft_acceptance=0.62,
        )
    )
    assert bar.speculative.text() == "Spec 50%"
    assert bar.speculative.toolTip() == (
        "Draft model SmolLM2-135M-Instruct.Q4_1: 62% of its drafts accepted"
    )
    bar.set_figures(ServerFigures(drafter="draft", acceptance=None, draft_model="d"))
    assert bar.speculative.toolTip() == "Draft model d: no drafts yet"
