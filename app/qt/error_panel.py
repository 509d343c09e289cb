"""The one place errors appear: plain words, and the engine's last log lines one click away."""

from __future__ import annotations

import logging

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

# Longer messages (a server's whole error page) are cut; the log has the rest.
MAX_MESSAGE = 600


class ErrorPanel(QFrame):
    """A dismissable banner; `show_error` replaces whatever it showed before."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("errorPanel")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 10, 10, 10)
        lay.setSpacing(6)
        row = QHBoxLayout()
        self.message = QLabel()
        # Messages may quote a remote server: plain text, never HTML.
        self.message.setTextFormat(Qt.TextFormat.PlainText)
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        row.addWidget(self.message, 1)
        self.log_button = QToolButton()
        self.log_button.setText("Show engine log")
        self.log_button.setCheckable(True)
        self.log_button.toggled.connect(self._toggle_log)
        row.addWidget(self.log_button, 0, Qt.AlignmentFlag.AlignTop)
        dismiss = QToolButton()
        dismiss.setText("Dismiss")
        dismiss.clicked.connect(self.clear)
        row.addWidget(dismiss, 0, Qt.AlignmentFlag.AlignTop)
        lay.addLayout(row)
        self.log = QPlainTextEdit()
        self.log.setObjectName("engineLog")
        self.log.setReadOnly(True)
        self.log.setFixedHeight(160)
        self.log.hide()
        lay.addWidget(self.log)
        self.hide()

    def show_error(self, message: str, log_text: str | None = None) -> None:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        self.message.setText(message)
        self.log.setPlainText(log_text or "")
        self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())
        self.log_button.setVisible(bool(log_text))
        if not log_text:
            self.log_button.setChecked(False)
        self.show()

    def append_note(self, note: str) -> None:
        if self.isVisible():
            self.message.setText(f"{self.message.text()} {note}")

    def clear(self) -> None:
        self.log_button.setChecked(False)
        self.hide()

    def _toggle_log(self, shown: bool) -> None:
        self.log.setVisible(shown)
        self.log_button.setText("Hide engine log" if shown else "Show engine log")


class ErrorReporter:
    """The one place errors reach the user: logs them, shows them on the panel.

    `engine_error_shown` is True while the panel shows an engine failure, so a
    later, lesser message does not hide it and "running again" can be appended.
    """

    def __init__(self, panel: ErrorPanel) -> None:
        self.panel = panel
        self.engine_error_shown = False

    def show(self, message: str, log_text: str | None = None, *, engine: bool = False) -> None:
        log.warning("shown to user: %s", message)
        self.engine_error_shown = engine
        self.panel.show_error(message, log_text)

    def note(self, note: str) -> None:
        """Appends to an engine failure still on screen (e.g. "running again")."""
        if self.panel.isVisible() and self.engine_error_shown:
            self.panel.append_note(note)

    def clear_unless_engine(self) -> None:
        if not self.engine_error_shown:
            self.panel.clear()
