"""The status bar: engine state, model, context, speed, TTFT, speculation, tools, memory, runtime."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar, QWidget

from app.services.engine.client import ServerFigures

DASH = "—"
# The engine's name for the llama.cpp built into Peregrine (docs/api.md, "Engine runtimes").
BUILT_IN_NAME = "default"
BUILT_IN_WORDS = "built-in"


def _mib(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return DASH
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


class StatusBar(QStatusBar):
    """Draws figures it is handed; it computes nothing but their formatting.

    The figures belong to the server answers come from: `reset()` puts dashes
    everywhere when that server changes, until its own figures arrive.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setSizeGripEnabled(False)
        self.state = QLabel("Engine: starting")
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.model = QLabel(f"Model: {DASH}")
        self.context = QLabel()
        self.speed = QLabel()
        self.ttft = QLabel()
        self.speculative = QLabel()
        self.tools = QLabel()
        self.memory = QLabel()
        self.runtime = QLabel()
        self.addWidget(self.state)
        self.addWidget(self.progress)
        for label in (
            self.model,
            self.context,
            self.speed,
            self.ttft,
            self.speculative,
            self.tools,
            self.memory,
            self.runtime,
        ):
            self.addPermanentWidget(label)
        self.n_ctx: int | None = None
        self.context_used: int | None = None
        self.reset()

    def reset(self) -> None:
        """Dashes for every figure: nothing is known about the new server yet."""
        self.n_ctx = None
        self.context_used = None
        self.speed.setText(f"{DASH} tok/s")
        self.ttft.setText(f"TTFT {DASH}")
        self.speculative.setText(f"Spec {DASH}")
        self.tools.setText(f"Tools {DASH}")
        self.tools.setToolTip("")
        self.memory.setText(f"Memory {DASH}")
        self.memory.setToolTip("")
        self.runtime.setText(f"Runtime {DASH}")
        self.runtime_in_use: str | None = None  # the engine's runtime name (Settings marks it)
        self.runtime.setToolTip("")
        self._draw_context()

    def set_engine_state(self, text: str, progress: float | None = None) -> None:
        self.state.setText(text)
        if progress is None:
            self.progress.hide()
        else:
            self.progress.setValue(int(progress * 100))
            self.progress.show()

    def set_model(self, name: str) -> None:
        self.model.setText(f"Model: {name or DASH}")
        self.model.setToolTip(name)

    def set_figures(self, figures: ServerFigures | None) -> None:
        """The server's own figures; None (a server that says nothing) leaves dashes."""
        if figures is None:
            return
        if figures.n_ctx is not None:
            self.n_ctx = figures.n_ctx
        if figures.memory_total is not None:
            self.memory.setText(f"Memory {_mib(figures.memory_total)}")
            self.memory.setToolTip(
                " · ".join(f"{name} {_mib(size)}" for name, size in figures.memory_parts.items())
            )
        if figures.drafter and figures.acceptance is not None:
            self.speculative.setText(f"Spec {figures.acceptance * 100:.0f}%")
        if figures.draft_model:
            accepted = (
                f"{figures.draft_acceptance * 100:.0f}% of its drafts accepted"
                if figures.draft_acceptance is not None
                else "no drafts yet"
            )
            self.speculative.setToolTip(f"Draft model {figures.draft_model}: {accepted}")
        if figures.tool_format is not None:
            self._draw_tools(figures)
        if figures.runtime is not None:
            self._draw_runtime(figures)
        self._draw_context()

    def _draw_runtime(self, figures: ServerFigures) -> None:
        """The engine runtime in use; a warning mark when it replaced the one asked for."""
        self.runtime_in_use = figures.runtime
        name = BUILT_IN_WORDS if figures.runtime == BUILT_IN_NAME else figures.runtime
        backend = f" ({figures.runtime_backend})" if figures.runtime_backend else ""
        if figures.runtime_fallback:
            self.runtime.setText(f"Runtime {name} ⚠")
            self.runtime.setToolTip(
                f"Runtime {name}{backend}, instead of the one asked for: {figures.runtime_fallback}"
            )
        else:
            self.runtime.setText(f"Runtime {name}")
            self.runtime.setToolTip(f"Runtime {name}{backend}")

    def _draw_tools(self, figures: ServerFigures) -> None:
        """The model's tool-call format, with a mark for its self-test."""
        name = figures.tool_format
        if figures.tool_self_test is None:
            self.tools.setText(f"Tools {name} …")
            self.tools.setToolTip(f"Tool calls use the {name} format; the self-test is pending")
        elif figures.tool_self_test:
            self.tools.setText(f"Tools {name} ✓")
            self.tools.setToolTip(
                f"Tool calls use the {name} format; a forced test call parsed back after load"
            )
        else:
            self.tools.setText(f"Tools {name} ✗")
            self.tools.setToolTip(
                f"Tool calls use the {name} format; the self-test failed: {figures.tool_detail}"
            )

    def set_answer_figures(self, timings: dict[str, Any], ttft_ms: float | None) -> None:
        tps = timings.get("predicted_per_second")
        if isinstance(tps, int | float):
            self.speed.setText(f"{tps:.1f} tok/s")
        if ttft_ms is not None:
            self.ttft.setText(f"TTFT {ttft_ms:.0f} ms")
        used = sum(int(timings.get(k) or 0) for k in ("prompt_n", "cache_n", "predicted_n"))
        if used:
            self.context_used = used
        drafted = int(timings.get("draft_n") or 0)
        if drafted:
            accepted = int(timings.get("draft_n_accepted") or 0)
            self.speculative.setText(f"Spec {accepted / drafted * 100:.0f}% ({accepted}/{drafted})")
        self._draw_context()

    def _draw_context(self) -> None:
        used = DASH if self.context_used is None else f"{self.context_used:,}"
        total = DASH if self.n_ctx is None else f"{self.n_ctx:,}"
        self.context.setText(f"Context {used} / {total}")
