"""The status bar: engine state, model, context, speed, time to first token, speculation, memory."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar, QWidget


def _mib(n: Any) -> str:
    try:
        value = float(n)
    except (TypeError, ValueError):
        return "—"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


class StatusBar(QStatusBar):
    """Draws figures it is handed; it computes nothing but their formatting."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setSizeGripEnabled(False)
        self.state = QLabel("Engine: starting")
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.model = QLabel("Model: —")
        self.context = QLabel("Context: —")
        self.speed = QLabel("— tok/s")
        self.ttft = QLabel("TTFT —")
        self.speculative = QLabel("Spec —")
        self.memory = QLabel("Memory —")
        self.addWidget(self.state)
        self.addWidget(self.progress)
        for label in (
            self.model,
            self.context,
            self.speed,
            self.ttft,
            self.speculative,
            self.memory,
        ):
            self.addPermanentWidget(label)
        self.n_ctx: int | None = None
        self.context_used: int | None = None

    def set_engine_state(self, text: str, progress: float | None = None) -> None:
        self.state.setText(text)
        if progress is None:
            self.progress.hide()
        else:
            self.progress.setValue(int(progress * 100))
            self.progress.show()

    def set_model(self, name: str) -> None:
        self.model.setText(f"Model: {name or '—'}")
        self.model.setToolTip(name)

    def set_engine_status(self, status: dict[str, Any]) -> None:
        settings = status.get("settings") or {}
        if isinstance(settings.get("n_ctx"), int):
            self.n_ctx = settings["n_ctx"]
        memory = status.get("memory") or {}
        if memory.get("total") is not None:
            self.memory.setText(f"Memory {_mib(memory['total'])}")
            self.memory.setToolTip(
                "weights {} · KV cache {} · compute {}".format(
                    _mib(memory.get("weights")), _mib(memory.get("kv")), _mib(memory.get("compute"))
                )
            )
        spec = status.get("speculative") or {}
        if spec.get("drafter") and spec.get("acceptance") is not None:
            self.speculative.setText(f"Spec {float(spec['acceptance']) * 100:.0f}%")
        self._draw_context()

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
        used = "—" if self.context_used is None else f"{self.context_used:,}"
        total = "—" if self.n_ctx is None else f"{self.n_ctx:,}"
        self.context.setText(f"Context {used} / {total}")
