"""`peregrine gui`: starts the desktop app and its engine; quits cleanly on close, SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from types import FrameType

from PySide6.QtCore import QSocketNotifier, QTimer
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication, QMessageBox

from app.qt.about import add_about_action, app_icon
from app.qt.engine_supervisor import EngineSupervisor
from app.qt.main_window import MainWindow
from app.services.chat.store import ChatStore
from app.services.models.fit import HardwareSource, planner_wiring
from app.services.settings import SettingsStore
from engine.default_model import default_model_path
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.planning.profile_cli import load_hardware_file

log = logging.getLogger(__name__)


class SignalBridge:
    """Lets SIGTERM/SIGINT reach Python while Qt's event loop runs.

    Python runs signal handlers only when it gets control; Qt's loop is C++.
    `signal.set_wakeup_fd` writes a byte to a socket on each signal, and a
    QSocketNotifier on the other end wakes the loop, so the handler runs now.
    """

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._notifier = QSocketNotifier(self._read.fileno(), QSocketNotifier.Type.Read)
        self._notifier.activated.connect(self._drain)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno())

    def _drain(self) -> None:
        try:
            self._read.recv(64)
        except BlockingIOError:
            pass  # nothing left: another activation drained it

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        self._notifier.setEnabled(False)
        self._read.close()
        self._write.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peregrine gui", description="open the desktop app")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest answer (tokens)")
    parser.add_argument(
        "--hardware",
        metavar="FILE",
        help="plan for a described machine: the `hardware` object `peregrine profile --json` "
        "prints (the wizard and the fit badges use it instead of this computer)",
    )
    args = parser.parse_args(argv)
    # Checked before any window opens: a bad file is one error line (docs/planner.md).
    hardware = (
        HardwareSource(load_hardware_file(args.hardware), file=args.hardware)
        if args.hardware
        else HardwareSource()
    )

    app = QApplication.instance() or QApplication([sys.argv[0]])
    assert isinstance(app, QApplication)
    app.setApplicationName("Peregrine")
    app.setFont(QFont("DejaVu Sans", 10))
    app.setWindowIcon(app_icon())
    app.setDesktopFileName("peregrine")  # matches the installed peregrine.desktop
    paths = Paths.from_env().ensure()
    settings_store = SettingsStore(paths.settings_file)
    settings, warning = settings_store.load_or_reset()
    # Saves run on the GUI thread: a lock held by another program may stall it
    # 0.1 s (then the text is held and retried once a second), never 5 s a token.
    try:
        store, recovered = ChatStore.open_or_recover(paths.chats_db, busy_timeout_s=0.1)
    except PeregrineError as exc:
        # Started from a desktop icon nobody reads stderr: say it in a window too.
        QMessageBox.critical(None, "Peregrine cannot open your chats", str(exc))
        raise
    supervisor = EngineSupervisor()
    fit, _pick, _reader = planner_wiring(hardware)  # the library's fit badges
    window = MainWindow(
        store,
        settings_store,
        supervisor,
        default_model_path,
        settings,
        max_tokens=args.max_tokens,
        paths=paths,
        fit=fit,
        hardware=hardware,
    )
    add_about_action(window, paths)
    for notice in (warning, recovered):
        if notice:
            window.show_error(notice)
    window.closed.connect(app.quit)
    app.setQuitOnLastWindowClosed(False)  # the window quits the app once the engine is down

    bridge = SignalBridge()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: quitting", signum)
        # Leave the signal handler first; the shutdown itself runs in the event loop.
        QTimer.singleShot(0, window.shut_down)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    window.show()
    window.start_engine()  # at once: the wizard on the first run does not hold it up
    if not settings.wizard_shown and settings.last_model_path is None:
        window.open_wizard(first_run=True)
    try:
        return int(app.exec())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        bridge.close()
        store.close()
