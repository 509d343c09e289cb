"""Background work for the GUI: a streaming worker on its own QThread, and one-shot calls.

Workers emit plain data through signals and always emit `finished` in a
`finally`, so no button stays disabled after a failure. A background call
whose caller gave no error handler reports its failure to the user (through
the `report` function the window passes in), never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, QTimer, Signal, Slot

from app.services.engine.client import (
    CancelToken,
    Delta,
    Endpoint,
    EngineClient,
    EngineClientError,
    ErrorKind,
    Finished,
)
from engine.errors import PeregrineError

log = logging.getLogger(__name__)


class StreamWorker(QObject):
    """Streams one chat completion; lives on a worker thread."""

    delta = Signal(int, str)  # generation id, text
    done = Signal(int, object)  # generation id, Finished
    failed = Signal(int, str, object)  # generation id, message, ErrorKind
    finished = Signal(int)

    def __init__(
        self,
        generation_id: int,
        endpoint: Endpoint,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
    ) -> None:
        super().__init__()
        self.generation_id = generation_id
        self._endpoint = endpoint
        self._messages = messages
        self._params = params
        self._cancel = CancelToken()

    def cancel(self) -> None:
        """Safe to call from the GUI thread while run() blocks on the network."""
        self._cancel.cancel()

    @Slot()
    def run(self) -> None:
        gid = self.generation_id
        try:
            with EngineClient(self._endpoint) as client:
                for event in client.stream_chat(self._messages, self._params, self._cancel):
                    if isinstance(event, Delta):
                        self.delta.emit(gid, event.text)
                    elif isinstance(event, Finished):
                        self.done.emit(gid, event)
        except EngineClientError as exc:
            self.failed.emit(gid, str(exc), exc.kind)
        except Exception as exc:
            log.exception("streaming failed")
            self.failed.emit(gid, f"unexpected error while streaming: {exc}", ErrorKind.INTERNAL)
        finally:
            self.finished.emit(gid)


class StreamRunner(QObject):
    """Owns the thread of the one stream in flight.

    `stream_finished` is emitted after `busy` has turned False, so whoever
    listens to it may start the next stream at once.
    """

    stream_finished = Signal(int)  # generation id

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread: QThread | None = None
        self.worker: StreamWorker | None = None
        # Threads and workers stay referenced until their thread has finished:
        # dropping the last Python reference earlier would delete them while
        # they still run or while their own signal is being delivered.
        self._alive: dict[QThread, StreamWorker] = {}

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self, worker: StreamWorker) -> None:
        if self.worker is not None:
            raise RuntimeError("a stream is already running")
        thread = QThread()
        thread.setObjectName(f"stream-{worker.generation_id}")
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.finished.connect(thread.quit)
        worker.finished.connect(self._on_finished)
        thread.finished.connect(self._on_thread_finished)
        self._alive[thread] = worker
        self._thread, self.worker = thread, worker
        thread.start()

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def shutdown(self, wait_ms: int = 3000) -> None:
        """Cancels and joins the streams' threads; used only when the app quits."""
        self.cancel()
        for thread in list(self._alive):
            thread.quit()
            thread.wait(wait_ms)

    @Slot(int)
    def _on_finished(self, gid: int) -> None:
        self._thread, self.worker = None, None
        self.stream_finished.emit(gid)

    @Slot()
    def _on_thread_finished(self) -> None:
        thread = self.sender()
        # Released after this signal's delivery has completed.
        QTimer.singleShot(0, lambda: self._alive.pop(thread, None))  # type: ignore[call-overload]


class _CallSignals(QObject):
    ok = Signal(object)
    error = Signal(str)


class _Call(QRunnable):
    def __init__(self, fn: Callable[[], Any], signals: _CallSignals, what: str) -> None:
        super().__init__()
        self._fn = fn
        self._signals = signals
        self._what = what

    def run(self) -> None:
        try:
            result = self._fn()
        except PeregrineError as exc:
            log.info("%s failed: %s", self._what, exc)
            self._signals.error.emit(str(exc))
        except Exception as exc:
            log.warning("%s failed", self._what, exc_info=True)
            self._signals.error.emit(f"{type(exc).__name__}: {exc}")
        else:
            self._signals.ok.emit(result)


def _log_only(message: str) -> None:
    log.warning("background failure (no window to show it): %s", message)


class BackgroundCalls(QObject):
    """Runs short blocking calls off the GUI thread; callbacks run on the GUI thread.

    A failure goes to `on_error` when the caller gives one, else to `report`
    as "<what> failed: <reason>", which the window shows to the user.
    """

    def __init__(
        self,
        report: Callable[[str], None] = _log_only,
        parent: QObject | None = None,
        *,
        threads: int = 4,
    ) -> None:
        super().__init__(parent)
        self._report = report
        self._pool = QThreadPool(self)
        # Library listings (header reads) may take seconds; status polls must not wait behind them.
        self._pool.setMaxThreadCount(threads)
        self._pending: set[_CallSignals] = set()
        self._closed = False

    def run(
        self,
        fn: Callable[[], Any],
        on_ok: Callable[[Any], None],
        on_error: Callable[[str], None] | None = None,
        *,
        what: str = "A background task",
    ) -> None:
        if self._closed:
            return
        signals = _CallSignals()  # created here, so it lives on the GUI thread
        self._pending.add(signals)
        report = on_error or (lambda message: self._report(f"{what} failed: {message}"))
        # After shutdown the widgets these callbacks draw on may be gone: results are dropped.
        signals.ok.connect(lambda result: None if self._closed else on_ok(result))
        signals.error.connect(lambda message: None if self._closed else report(message))
        # Dropped only after the signal's delivery: deleting a QObject inside its
        # own emission crashes.
        signals.ok.connect(lambda _r: QTimer.singleShot(0, lambda: self._pending.discard(signals)))
        signals.error.connect(
            lambda _e: QTimer.singleShot(0, lambda: self._pending.discard(signals))
        )
        self._pool.start(_Call(fn, signals, what))

    def shutdown(self, wait_ms: int = 3000) -> None:
        """Waits a while for calls in flight; any that end later are ignored."""
        self._closed = True
        self._pool.waitForDone(wait_ms)
