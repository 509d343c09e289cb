"""What the status bar says, and about which server.

With a remote server in use, the bar shows that server's name and figures
(or dashes where it has none); the local engine's events still arrive but do
not overwrite them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QTimer

from app.qt.engine_controller import EngineController
from app.qt.status_bar import StatusBar
from app.qt.workers import BackgroundCalls
from app.services.engine.client import Endpoint, EngineClient, ServerFigures
from app.services.engine.launch import SupervisorState
from app.services.settings import Settings

# How often, and how many times, the bar looks again for a pending tool self-test.
SELF_TEST_POLL_MS = 2000
SELF_TEST_POLLS = 30

STATE_WORDS = {
    SupervisorState.STARTING: "Engine: starting…",
    SupervisorState.READY: "● Engine ready",
    SupervisorState.RESTARTING: "Engine: restarting…",
    SupervisorState.FAILED: "Engine: stopped (see the error above)",
    SupervisorState.STOPPING: "Engine: stopping…",
    SupervisorState.STOPPED: "Engine: stopped",
}


class StatusController(QObject):
    """Feeds the status bar from the engine, the answers and the server in use."""

    def __init__(
        self,
        bar: StatusBar,
        engine: EngineController,
        settings: Callable[[], Settings],
        endpoint: Callable[[], Endpoint | None],
        background: BackgroundCalls,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.bar = bar
        self._engine = engine
        self._settings = settings
        self._endpoint = endpoint
        self._background = background
        self._generation = 0  # figures fetched for an earlier server are dropped
        self._self_test_polls = 0
        self.closing = False
        s = engine.supervisor
        s.state_changed.connect(self._on_state)
        s.loading.connect(self._on_start_progress)
        engine.load_started.connect(self._on_load_started)
        engine.load_progress.connect(self._on_load_progress)
        engine.load_finished.connect(lambda _p: self.server_changed())
        engine.load_failed.connect(lambda _p, _m: self._draw_local())
        engine.model_changed.connect(self._on_model_changed)

    @property
    def _remote(self) -> str | None:
        return self._settings().active_endpoint

    def server_changed(self) -> None:
        """Answers come from another server (or model): forget the old figures, fetch new."""
        self._generation += 1
        self._self_test_polls = 0
        self.bar.reset()
        self._draw_local()
        self.refresh()

    def _draw_local(self) -> None:
        remote = self._settings().endpoint(self._remote)
        if remote is not None:
            self.bar.set_engine_state(f"Server: {remote.name}")
            self.bar.set_model(remote.model or "server default")
            return
        self.bar.set_engine_state(STATE_WORDS[self._engine.supervisor.state])
        current = self._engine.current
        self.bar.set_model(current.stem if current is not None else "")

    def refresh(self) -> None:
        """Asks the server in use for its figures (context, memory, speculation)."""
        endpoint = self._endpoint()
        if endpoint is None or self.closing:
            return
        generation = self._generation

        def fetch() -> ServerFigures | None:
            with EngineClient(endpoint, connect_timeout=2.0) as client:
                return client.figures()

        def done(figures: ServerFigures | None) -> None:
            if generation == self._generation and not self.closing:
                self.bar.set_figures(figures)
                if (
                    figures is not None
                    and figures.tool_format is not None
                    and figures.tool_self_test is None
                    and self._self_test_polls < SELF_TEST_POLLS
                ):
                    # The tool self-test runs once the engine is idle: look again shortly.
                    self._self_test_polls += 1
                    QTimer.singleShot(SELF_TEST_POLL_MS, self.refresh)

        def failed(_message: str) -> None:
            pass  # the figures stay dashes; a failing answer says what is wrong

        self._background.run(fetch, done, failed, what="Reading the server's figures")

    def answer_done(self, timings: dict[str, Any], ttft_ms: float | None) -> None:
        self.bar.set_answer_figures(timings, ttft_ms)
        self.refresh()

    # local engine events ------------------------------------------------------

    def _on_state(self, state: SupervisorState) -> None:
        if self._remote is None:
            progress = 0.0 if state is SupervisorState.STARTING else None
            self.bar.set_engine_state(STATE_WORDS[state], progress)

    def _on_start_progress(self, progress: float) -> None:
        if self._remote is None:
            self.bar.set_engine_state(f"Loading model {progress:.0%}", progress)

    def _on_load_started(self, path: str) -> None:
        if self._remote is None:
            name = path.rsplit("/", 1)[-1]
            self.bar.set_engine_state(f"Loading {name}…", 0.0)

    def _on_load_progress(self, progress: float) -> None:
        if self._remote is None and self._engine.loading is not None:
            self.bar.set_engine_state(
                f"Loading {self._engine.loading.name} {progress:.0%}", progress
            )

    def _on_model_changed(self) -> None:
        if self._remote is None:
            self.server_changed()
