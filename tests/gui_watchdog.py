"""A GUI-thread stall watchdog for tests: fails if the event loop is stuck for more than 1 s.

A QTimer on the GUI thread stamps a heartbeat every few milliseconds; a plain
Python thread checks the stamp. When the GUI thread has not beaten for longer
than the limit, the watchdog captures the GUI thread's stack right then (via
sys._current_frames, and faulthandler for every thread) so the failure says
where it was stuck. It also records the worst event-loop lag it saw: the
longest gap between two beats minus the timer's interval.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
import traceback

from PySide6.QtCore import QObject, QTimer


class GuiWatchdog(QObject):
    """Watches the thread that created it (the GUI thread)."""

    def __init__(self, limit_s: float = 1.0, interval_ms: int = 10) -> None:
        super().__init__()
        self.limit_s = limit_s
        self.interval_s = interval_ms / 1000.0
        self._gui_ident = threading.get_ident()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._beat)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.worst_lag_s = 0.0
        self.beats = 0
        self.armed = False  # stalls count only while armed (while an answer streams)
        self.armed_s = 0.0
        self.stalls: list[str] = []

    def start(self) -> GuiWatchdog:
        with self._lock:
            self._last = time.monotonic()
        self._timer.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="gui-watchdog", daemon=True)
        self._thread.start()
        return self

    def arm(self, *_args: object) -> None:
        with self._lock:
            self._last = time.monotonic()
            self._armed_at = self._last
            self.armed = True

    def disarm(self, *_args: object) -> None:
        with self._lock:
            if self.armed:
                self.armed_s += time.monotonic() - self._armed_at
            self.armed = False

    def watch_streams(self, started: object, finished: object) -> GuiWatchdog:
        """Arms on `started` and disarms on `finished` (two Qt signals)."""
        started.connect(self.arm)  # type: ignore[attr-defined]
        finished.connect(self.disarm)  # type: ignore[attr-defined]
        return self

    _armed_at = 0.0

    def stop(self) -> None:
        self._timer.stop()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raises AssertionError, with the captured stack, if the GUI thread stalled."""
        if self.stalls:
            raise AssertionError(
                f"GUI thread stuck for more than {self.limit_s:.1f} s:\n" + self.stalls[0]
            )

    def _beat(self) -> None:
        now = time.monotonic()
        with self._lock:
            gap = now - self._last
            self._last = now
            armed = self.armed
        if armed:
            self.beats += 1
            self.worst_lag_s = max(self.worst_lag_s, gap - self.interval_s)

    def _watch(self) -> None:
        reported_for: float | None = None
        while not self._stop.wait(0.05):
            with self._lock:
                last, armed = self._last, self.armed
            if armed and time.monotonic() - last > self.limit_s and reported_for != last:
                reported_for = last
                frame = sys._current_frames().get(self._gui_ident)
                stack = "".join(traceback.format_stack(frame)) if frame else "(no frame)"
                self.stalls.append(stack)
                try:
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                except (ValueError, OSError):  # pytest's capture may hide the real fd
                    faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
