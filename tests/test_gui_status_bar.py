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


def test_the_runtime_in_use_and_a_fallback_show_in_the_status_bar(qtbot: QtBot) -> None:
    bar = StatusBar()
    qtbot.addWidget(bar)
    assert bar.runtime.text() == "Runtime —"
    bar.set_figures(ServerFigures(runtime="cuda12", runtime_backend="cuda"))
    assert bar.runtime.text() == "Runtime cuda12"
    assert bar.runtime.toolTip() == "Runtime cuda12 (cuda)"
    reason = "runtime 'cuda12' crashed in the self-test (SIGSEGV); using the cpu runtime 'cpu'"
    bar.set_figures(ServerFigures(runtime="cpu", runtime_backend="cpu", runtime_fallback=reason))
    assert bar.runtime.text() == "Runtime cpu ⚠"
    assert bar.runtime.toolTip() == f"Runtime cpu (cpu), instead of the one asked for: {reason}"
    bar.reset()
    bar.set_figures(ServerFigures(runtime="default", runtime_backend="cpu"))
    assert bar.runtime.text() == "Runtime built-in"
