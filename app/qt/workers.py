"""Background work for the GUI: a streaming worker on its own QThread, and one-shot calls.

Workers emit plain data through signals and always emit `finished` in a
`finally`, so no button stays disabled after a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, Signal, Slot

from app.services.engine_client import (
    CancelToken,
    Delta,
    Endpoint,
    EngineClient,
    EngineClientError,
    Finished,
)

log = logging.getLogger(__name__)


class StreamWorker(QObject):
    """Streams one chat completion; lives on a worker thread."""

    delta = Signal(int, str)  # generation id, text
    done = Signal(int, object)  # generation id, Finished
    failed = Signal(int, str, str)  # generation id, message, kind
    finished = Signal(int)

    def __init__(
        self,
        generation_id: int,
        endpoint: Endpoint,
        messages: list[dict[str, str]],
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
            self.failed.emit(gid, f"unexpected error while streaming: {exc}", "internal")
        finally:
            self.finished.emit(gid)


class StreamRunner(QObject):
    """Owns the thread of the one stream in flight."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread: QThread | None = None
        self.worker: StreamWorker | None = None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self, worker: StreamWorker) -> None:
        if self.worker is not None:
            raise RuntimeError("a stream is already running")
        thread = QThread(self)  # parented: Qt, not Python GC, decides when it is deleted
        thread.setObjectName(f"stream-{worker.generation_id}")
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.finished.connect(thread.quit)
        worker.finished.connect(self._on_finished)
        thread.finished.connect(worker.deleteLater)
        thread.finished.connect(thread.deleteLater)
        self._thread, self.worker = thread, worker
        thread.start()

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def shutdown(self, wait_ms: int = 3000) -> None:
        """Cancels and joins the stream's thread; used only when the app quits."""
        thread = self._thread
        self.cancel()
        if thread is not None:
            thread.quit()
            thread.wait(wait_ms)

    @Slot(int)
    def _on_finished(self, _gid: int) -> None:
        self._thread, self.worker = None, None


class _CallSignals(QObject):
    ok = Signal(object)
    error = Signal(str)


class _Call(QRunnable):
    def __init__(self, fn: Callable[[], Any], signals: _CallSignals) -> None:
        super().__init__()
        self._fn = fn
        self._signals = signals

    def run(self) -> None:
        try:
            result = self._fn()
        except Exception as exc:
            log.debug("background call failed: %s", exc)
            self._signals.error.emit(str(exc))
        else:
            self._signals.ok.emit(result)


class BackgroundCalls(QObject):
    """Runs short blocking calls off the GUI thread; callbacks run on the GUI thread."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(2)
        self._pending: set[_CallSignals] = set()

    def run(
        self,
        fn: Callable[[], Any],
        on_ok: Callable[[Any], None],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        signals = _CallSignals()  # created here, so it lives on the GUI thread
        self._pending.add(signals)
        signals.ok.connect(on_ok)
        signals.ok.connect(lambda _r: self._pending.discard(signals))
        if on_error is not None:
            signals.error.connect(on_error)
        signals.error.connect(lambda _e: self._pending.discard(signals))
        self._pool.start(_Call(fn, signals))

    def shutdown(self, wait_ms: int = 3000) -> None:
        self._pool.waitForDone(wait_ms)
