"""Runs the local engine with QProcess: start, follow its start-up, restart after a crash, stop.

Everything is asynchronous (QProcess signals and timers): the GUI thread never
waits on the engine. The decisions (events, stall timeout, restart budget, the
words of an error) come from app.services.engine.launch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal, Slot

from app.services.engine.launch import (
    LaunchSpec,
    LineSplitter,
    Loading,
    LogTail,
    Ready,
    RestartPolicy,
    StartFailed,
    StartupWatch,
    SupervisorState,
    describe_exit,
    parse_event,
    serve_command,
)

log = logging.getLogger(__name__)


class EngineSupervisor(QObject):
    """Keeps one `peregrine serve` process running for the app."""

    state_changed = Signal(object)  # SupervisorState
    loading = Signal(float)
    ready = Signal(object)  # Ready
    failed = Signal(str)  # could not start or keeps crashing; the log tail has details
    died = Signal(str)  # a running engine died; a restart follows when allowed
    stopped = Signal()

    def __init__(
        self,
        parent_pid: int | None = None,
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
        stall_timeout_s: float = 60.0,
        kill_after_ms: int = 3000,
        restart_policy: RestartPolicy | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._parent_pid = os.getpid() if parent_pid is None else parent_pid
        self._python = python
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        self._kill_after_ms = kill_after_ms
        self._restarts = restart_policy or RestartPolicy(clock)
        self.log_tail = LogTail()
        self.spec: LaunchSpec | None = None
        self.endpoint_info: Ready | None = None
        self.state = SupervisorState.STOPPED
        self._process: QProcess | None = None
        self._stdout = LineSplitter()
        self._start_error: str | None = None
        self._watch: StartupWatch | None = None
        self._stall_timer = QTimer(self)
        self._stall_timer.setInterval(1000)
        self._stall_timer.timeout.connect(self._check_stall)

    # intents ----------------------------------------------------------------

    def start(self, spec: LaunchSpec) -> None:
        """Starts the engine with this spec (stopping any running one first)."""
        self.spec = spec
        if self._process is not None:
            # Restart with the new spec once the old process is gone.
            self._after_stop = lambda: self._launch()
            self._terminate()
            return
        self._launch()

    def remember(self, spec: LaunchSpec) -> None:
        """The spec a crash restart uses from now on (the model loaded since the start)."""
        self.spec = spec

    def stop(self) -> None:
        """Asks the engine to exit (SIGTERM), then kills it if it lingers; emits stopped."""
        if self._process is None:
            self._set_state(SupervisorState.STOPPED)
            self.stopped.emit()
            return
        self._after_stop = None
        self._terminate()

    def pid(self) -> int | None:
        if self._process is None:
            return None
        pid = int(self._process.processId())
        return pid or None

    @property
    def running(self) -> bool:
        return self._process is not None

    # process handling -------------------------------------------------------

    _after_stop: Callable[[], None] | None = None

    def _launch(self) -> None:
        assert self.spec is not None
        argv = serve_command(self.spec, self._parent_pid, self._python)
        process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        # The key goes through the environment: a command line is readable by every user.
        if self.spec.api_key:
            env.insert("PEREGRINE_API_KEY", self.spec.api_key)
        else:
            env.remove("PEREGRINE_API_KEY")
        process.setProcessEnvironment(env)
        process.setProgram(argv[0])
        process.setArguments(argv[1:])
        process.readyReadStandardOutput.connect(self._read_stdout)
        process.readyReadStandardError.connect(self._read_stderr)
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_error)
        self._process = process
        self._stdout = LineSplitter()
        self._start_error = None
        self.endpoint_info = None
        self._watch = StartupWatch(self._stall_timeout_s, self._clock)
        self._set_state(SupervisorState.STARTING)
        log.info("starting engine: %s", " ".join(argv))
        self.log_tail.feed(f"[peregrine] starting engine with {self.spec.model}\n")
        process.start()
        log.info("engine started (pid %s)", process.processId())
        self._stall_timer.start()

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        self._set_state(SupervisorState.STOPPING)
        self._stall_timer.stop()
        process.terminate()
        QTimer.singleShot(self._kill_after_ms, lambda p=process: self._kill_if_running(p))

    def _kill_if_running(self, process: QProcess) -> None:
        if self._process is process and process.state() != QProcess.ProcessState.NotRunning:
            log.warning("engine ignored SIGTERM; killing it")
            process.kill()

    @Slot()
    def _read_stdout(self) -> None:
        if self._process is None:
            return
        chunk = bytes(self._process.readAllStandardOutput().data()).decode("utf-8", "replace")
        for line in self._stdout.feed(chunk):
            event = parse_event(line)
            if self.state is SupervisorState.STOPPING:
                # Read late (the GUI thread was busy): a process being stopped is
                # neither loading nor ready, or its exit would pass for a crash.
                continue
            if self._watch is not None:
                self._watch.saw(event)
            if isinstance(event, Loading):
                self.loading.emit(event.progress)
            elif isinstance(event, Ready):
                self.endpoint_info = event
                self._stall_timer.stop()
                log.info("engine ready on %s (model %s)", event.base_url, event.model)
                self._set_state(SupervisorState.READY)
                self.ready.emit(event)
            elif isinstance(event, StartFailed):
                self._start_error = event.message

    @Slot()
    def _read_stderr(self) -> None:
        if self._process is None:
            return
        chunk = bytes(self._process.readAllStandardError().data()).decode("utf-8", "replace")
        self.log_tail.feed(chunk)

    @Slot()
    def _check_stall(self) -> None:
        if (
            self.state is SupervisorState.STARTING
            and self._watch is not None
            and self._watch.stalled()
        ):
            self._start_error = (
                f"the engine did not finish starting within {self._stall_timeout_s:.0f} s"
            )
            if self._process is not None:
                self._process.kill()

    @Slot(QProcess.ProcessError)
    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self._process is not None:
            message = f"the engine could not be started: {self._process.errorString()}"
            self._process.deleteLater()
            self._process = None
            self._stall_timer.stop()
            self._set_state(SupervisorState.FAILED)
            self.failed.emit(message)

    @Slot(int, QProcess.ExitStatus)
    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        process = self._process
        if process is None:
            return
        # Drain what is left so the last words of a dying engine are kept.
        self._read_stderr()
        self._read_stdout()
        self._process = None
        process.deleteLater()
        self._stall_timer.stop()
        previous = self.state
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        # The message is taken from the engine's own lines, before our marker.
        last_lines = self.log_tail.lines(5)
        self.log_tail.feed(f"\n[peregrine] engine exited (code {exit_code}, crashed={crashed})\n")
        if previous is SupervisorState.STOPPING:
            after, self._after_stop = self._after_stop, None
            if after is not None:
                after()
                return
            self._set_state(SupervisorState.STOPPED)
            self.stopped.emit()
            return
        if previous is SupervisorState.STARTING:
            self._set_state(SupervisorState.FAILED)
            self.failed.emit(self._start_error or describe_exit(exit_code, crashed, last_lines))
            return
        # A ready engine died under us: say so and bring it back with the same spec.
        message = describe_exit(exit_code, crashed, last_lines)
        self.endpoint_info = None
        if self._restarts.allow():
            self._set_state(SupervisorState.RESTARTING)
            self.died.emit(message)
            QTimer.singleShot(int(self._restarts.delay_s() * 1000), self._restart)
        else:
            self._set_state(SupervisorState.FAILED)
            self.failed.emit(message + " It keeps stopping, so it was not restarted again.")

    def _restart(self) -> None:
        if self.state is SupervisorState.RESTARTING and self._process is None:
            self._launch()

    def _set_state(self, state: SupervisorState) -> None:
        if state != self.state:
            self.state = state
            self.state_changed.emit(state)
