"""Which model the local engine serves: start, switch (through /v1/engine/load), unload.

A switch goes through the running engine's API, so a model that fails to
load leaves the previous one serving (docs/api.md). Every model that came up
is remembered with its load settings: the crash restart (the supervisor's
spec) and the next app start use that model and those settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from app.qt.engine_supervisor import EngineSupervisor
from app.qt.error_panel import ErrorReporter
from app.qt.settings.controller import SettingsController
from app.qt.workers import BackgroundCalls
from app.services.engine.client import Endpoint, EngineClient
from app.services.engine.control import (
    LoadDone,
    LoadFailed,
    LoadStep,
    LoadUnderway,
    follow_load,
    load_request,
    load_settings_of,
)
from app.services.engine.launch import LaunchSpec, Ready, SupervisorState, launch_spec
from app.services.settings import LoadSettings
from engine.errors import PeregrineError
from engine.wire.control import LoadRequest

log = logging.getLogger(__name__)

POLL_MS = 250


class EngineController(QObject):
    """The local engine's current model, and every change of it."""

    model_changed = Signal()  # `current` changed (a model came up, or was unloaded)
    load_started = Signal(str)  # model path
    load_progress = Signal(float)
    load_finished = Signal(str)  # model path, serving now
    load_failed = Signal(str, str)  # model path, why (the previous model, if any, serves on)

    def __init__(
        self,
        supervisor: EngineSupervisor,
        settings: SettingsController,
        default_model: Callable[[], Path],
        background: BackgroundCalls,
        errors: ErrorReporter,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.supervisor = supervisor
        self._settings = settings
        self._default_model = default_model
        self._background = background
        self._errors = errors
        self.current: Path | None = None  # the model that serves
        self.loading: Path | None = None  # the model being loaded
        self._load: LoadSettings | None = None
        self.failure: str | None = None  # why the engine could not run, while it cannot
        self._poll = QTimer(self)
        self._poll.setInterval(POLL_MS)
        self._poll.timeout.connect(self._check_load)
        self._polling = False
        self._pending: tuple[Path, LoadRequest] | None = None  # a load waiting for the start
        s = supervisor
        s.ready.connect(self._on_ready)
        s.failed.connect(self._on_failed)
        s.died.connect(self._on_died)

    # intents ----------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine with the last model and its settings, or the built-in model."""
        settings = self._settings.settings
        last = settings.last_model_path
        model: Path
        if last and Path(last).is_file():
            model = Path(last)
        else:
            try:
                model = self._default_model()
            except PeregrineError as exc:
                self._errors.show(f"No model to start: {exc}")
                return
            if last:
                self._errors.show(f"The last model ({last}) is missing; using the built-in model.")
        self._start_with(model)

    def restart(self) -> None:
        """Starts the engine again with its model (the local API's port or key changed)."""
        if self.supervisor.spec is None:
            self.start()
            return
        self._start_with(self.current or self.supervisor.spec.model)

    def load(self, model: Path) -> None:
        """Switches to `model` with its remembered settings; the chat is kept."""
        if self.loading is not None:
            self._errors.show(f"{self.loading.name} is still loading; try again when it is done.")
            return
        if model == self.current and self.supervisor.state is SupervisorState.READY:
            return
        endpoint = self.endpoint()
        if endpoint is None or self.supervisor.state is not SupervisorState.READY:
            # No engine to ask: start one with this model.
            self._start_with(model)
            return
        load = self._settings.settings.load_settings(str(model))
        self._send_load(model, load_request(model, load, self._settings.settings.engine), load)

    def load_with(self, model: Path, request: LoadRequest) -> bool:
        """Loads `model` with exactly `request` (the wizard's Apply), the model in use too.

        While the engine starts, the load waits for it; with no engine, one starts
        with these settings. False when refused (another load runs; the user is told).
        """
        state = self.supervisor.state
        if state in (SupervisorState.STARTING, SupervisorState.RESTARTING):
            self._pending = (model, request)
            return True
        if self.loading is not None:
            self._errors.show(f"{self.loading.name} is still loading; try again when it is done.")
            return False
        load = load_settings_of(request)
        if (
            model == self.current
            and state is SupervisorState.READY
            and load == self._settings.settings.load_settings(str(model))
        ):
            self.load_finished.emit(str(model))  # already serving with these settings
            return True
        if self.endpoint() is None or state is not SupervisorState.READY:
            self._start_with(model, load)
            return True
        self._send_load(model, request, load)
        return True

    def _send_load(self, model: Path, request: LoadRequest, load: LoadSettings) -> None:
        endpoint = self.endpoint()
        if endpoint is None:
            return
        self.loading, self._load = model, load
        self.load_started.emit(str(model))
        self.load_progress.emit(0.0)

        def send() -> None:
            with EngineClient(endpoint, connect_timeout=2.0) as client:
                client.load(request)

        self._background.run(
            send,
            lambda _r: self._poll.start(),
            lambda message: self._finish_failed(message),
            what=f"Loading {model.name}",
        )

    def unload(self) -> None:
        """Frees the model's memory; chats get "no model is loaded" until the next load."""
        endpoint = self.endpoint()
        if endpoint is None or self.current is None:
            return

        def send() -> None:
            with EngineClient(endpoint, connect_timeout=2.0) as client:
                client.unload()

        def done(_r: object) -> None:
            self.current = None
            self.model_changed.emit()

        self._background.run(send, done, what="Unloading the model")

    def endpoint(self) -> Endpoint | None:
        """The local engine's API, or None while it is not ready."""
        ready = self.supervisor.endpoint_info
        if ready is None:
            return None
        return Endpoint(ready.base_url, ready.api_key, "")

    # engine events ----------------------------------------------------------

    def _start_with(self, model: Path, load: LoadSettings | None = None) -> None:
        settings = self._settings.settings
        load = load or settings.load_settings(str(model))
        spec = launch_spec(model, load, settings.engine, settings.local_api)
        self._stop_polling()
        self.loading, self._load = model, load
        self.load_started.emit(str(model))
        self.supervisor.start(spec)

    def _on_ready(self, _ready: Ready) -> None:
        spec = self.supervisor.spec
        if spec is None:
            return
        self.failure = None
        was_loading = self.loading
        self.current = spec.model
        load = self._load if was_loading == spec.model and self._load is not None else None
        self.loading, self._load = None, None
        self._settings.remember_load(
            spec.model, load or self._settings.settings.load_settings(str(spec.model))
        )
        if was_loading is not None:
            self.load_finished.emit(str(spec.model))
        self.model_changed.emit()
        if self._pending is not None:
            model, request = self._pending
            self._pending = None
            self.load_with(model, request)

    def _on_failed(self, message: str) -> None:
        self.failure = f"The engine could not run: {message}"
        hint = ""
        if "cannot listen" in message:
            hint = " Another program uses that port: pick another one in Settings → Local API."
        self._errors.show(self.failure + hint, self.supervisor.log_tail.text(40), engine=True)
        failed = self.loading
        self._stop_polling()
        self.loading, self._load = None, None
        self.current = None
        if failed is not None:
            self.load_failed.emit(str(failed), message)
        self.model_changed.emit()

    def _on_died(self, message: str) -> None:
        self._errors.show(
            f"{message} Restarting it with the same model; your chat is saved.",
            self.supervisor.log_tail.text(40),
            engine=True,
        )
        if self.loading is not None and self._polling_active():
            # The switch died with the engine; the restart brings the last good model back.
            self._finish_failed("the engine stopped while loading it")
        spec = self.supervisor.spec
        if spec is not None:
            # The restart's ready event reports this model again.
            self.loading, self._load = spec.model, None

    # following a load ---------------------------------------------------------

    def _polling_active(self) -> bool:
        return self._poll.isActive() or self._polling

    def _check_load(self) -> None:
        endpoint = self.endpoint()
        model = self.loading
        if self._polling or model is None:
            return
        if endpoint is None:
            return  # the engine is restarting; _on_died already decided
        self._polling = True

        def fetch() -> LoadStep | None:
            with EngineClient(endpoint, connect_timeout=2.0) as client:
                status = client.engine_status()
            return None if status is None else follow_load(status, str(model))

        def done(step: LoadStep | None) -> None:
            self._polling = False
            if self.loading != model or not self._poll.isActive():
                return
            if isinstance(step, LoadUnderway):
                self.load_progress.emit(step.progress)
            elif isinstance(step, LoadDone):
                self._finish_done(model)
            elif isinstance(step, LoadFailed):
                self._finish_failed(step.message)

        def failed(message: str) -> None:
            self._polling = False
            log.info("load status not read (%s); asking again", message)

        self._background.run(fetch, done, failed, what="Following the load")

    def _finish_done(self, model: Path) -> None:
        self._stop_polling()
        load = self._load or LoadSettings()
        self.loading, self._load = None, None
        self.current = model
        spec = self.supervisor.spec
        if spec is not None:
            self.supervisor.remember(spec.with_model(model, load, self._settings.settings.engine))
        self._settings.remember_load(model, load)
        self.load_finished.emit(str(model))
        self.model_changed.emit()

    def _finish_failed(self, message: str) -> None:
        model = self.loading
        self._stop_polling()
        self.loading, self._load = None, None
        if model is None:
            return
        serving = f" {self.current.name} is still in use." if self.current is not None else ""
        self._errors.show(f"{model.name} could not be loaded: {message.rstrip('.')}.{serving}")
        self.load_failed.emit(str(model), message)

    def _stop_polling(self) -> None:
        self._poll.stop()

    @property
    def spec(self) -> LaunchSpec | None:
        return self.supervisor.spec
