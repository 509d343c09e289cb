"""The Downloads tab: one row per download with its bar, speed, time left and buttons.

It draws `DownloadStatus` values and emits what the user asked for; the
controller owns the queue. Failures are shown in plain words with what to do.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from app.services.models.downloads import (
    DownloadStatus,
    FailureKind,
    JobState,
    format_bytes,
)

# What each failure means for the user, and what to do; the service's message follows.
FAILURE_TEXT = {
    FailureKind.NETWORK: "No connection to Hugging Face. Check the network, then Resume.",
    FailureKind.ACCESS: (
        "This repo is gated or private. Accept its licence on huggingface.co, save your "
        "token in Settings → Models, then Resume."
    ),
    FailureKind.NOT_FOUND: "The file is no longer on Hugging Face.",
    FailureKind.DISK_FULL: "The disk is full. Free some space, then Resume.",
    FailureKind.CHECKSUM: (
        "The download was corrupted on the way (checksum mismatch); the bad bytes were "
        "deleted. Resume downloads the file again."
    ),
    FailureKind.SERVER: "Hugging Face's servers kept failing. Resume later.",
    FailureKind.OTHER: "The download failed.",
}


def duration_text(seconds: float | None) -> str:
    """Time left for people: "45 s", "3 min", "1 h 20 min"."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def progress_text(st: DownloadStatus) -> str:
    """ "1.2 GB of 4.6 GB · 12.3 MB/s · 3 min left", as far as it is known."""
    if st.total:
        pct = st.done / st.total * 100
        amount = f"{format_bytes(st.done)} of {format_bytes(st.total)} ({pct:.0f}%)"
    else:
        amount = format_bytes(st.done) if st.done else ""
    bits = [amount] if amount else []
    if st.state is JobState.QUEUED:
        bits.append("waiting for a free slot (how many run at once: Settings → Models)")
    if st.state is JobState.RUNNING:
        if st.speed > 0:
            bits.append(f"{format_bytes(st.speed)}/s")
            left = duration_text(st.eta)
            if left:
                bits.append(f"{left} left")
        else:
            bits.append("starting…" if not st.done else "waiting for the server…")
    return " · ".join(bits)


STATE_TEXT = {
    JobState.QUEUED: "Waiting",
    JobState.RUNNING: "Downloading",
    JobState.PAUSED: "Paused",
    JobState.DONE: "Downloaded",
    JobState.FAILED: "Failed",
    JobState.CANCELLED: "Cancelled",
}


class DownloadRow(QFrame):
    """One download: name, state, bar, figures, buttons; redrawn from each status."""

    def __init__(self, tab: DownloadsTab, status: DownloadStatus) -> None:
        super().__init__()
        self.setObjectName("card")
        self.job_id = status.job_id
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 10, 14, 10)
        lay.setSpacing(6)
        top = QHBoxLayout()
        names = QVBoxLayout()
        names.setSpacing(1)
        self.name = QLabel(status.name)
        self.name.setObjectName("rowTitle")
        self.repo = QLabel(status.repo_id)
        self.repo.setObjectName("hint")
        names.addWidget(self.name)
        names.addWidget(self.repo)
        top.addLayout(names, 1)
        self.state = QLabel("")
        self.state.setObjectName("hint")
        top.addWidget(self.state)
        self.pause = QPushButton("Pause")
        self.resume = QPushButton("Resume")
        self.resume.setObjectName("primary")
        self.cancel = QPushButton("Cancel")
        self.load = QPushButton("Load")
        self.load.setObjectName("primary")
        self.clear = QPushButton("Clear")
        self.clear.setToolTip("Remove from this list (the model stays in the library)")
        for button, signal in (
            (self.pause, tab.pause_requested),
            (self.resume, tab.resume_requested),
            (self.cancel, tab.cancel_requested),
            (self.load, tab.load_requested),
            (self.clear, tab.clear_requested),
        ):
            button.clicked.connect(lambda _c=False, s=signal: s.emit(self.job_id))
            top.addWidget(button)
        lay.addLayout(top)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        lay.addWidget(self.bar)
        self.figures = QLabel("")
        self.figures.setObjectName("hint")
        lay.addWidget(self.figures)
        self.problem = QLabel("")
        self.problem.setObjectName("problem")
        self.problem.setWordWrap(True)
        self.problem.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.problem.hide()
        lay.addWidget(self.problem)
        self.status = status
        self.draw(status)

    def draw(self, st: DownloadStatus) -> None:
        self.status = st
        self.state.setText(STATE_TEXT[st.state])
        self.bar.setValue(int(st.done / st.total * 1000) if st.total else 0)
        self.bar.setVisible(
            st.state not in (JobState.DONE, JobState.CANCELLED)
            and not (st.state is JobState.FAILED and not st.done)
        )
        self.figures.setText(
            progress_text(st)
            if st.state is not JobState.DONE
            else f"{format_bytes(st.total)} · in the library"
        )
        self.figures.setVisible(st.state is not JobState.CANCELLED and bool(self.figures.text()))
        if st.state is JobState.FAILED:
            kind = st.kind or FailureKind.OTHER
            kept = " What was downloaded so far is kept." if st.done else ""
            if kind is FailureKind.CHECKSUM:
                kept = ""
            # The service's own line adds the detail (which server, which status), except
            # where it speaks of the command line's remedies that the plain text replaces.
            detail = "" if kind in (FailureKind.ACCESS, FailureKind.DISK_FULL) else st.error
            self.problem.setText(f"{FAILURE_TEXT[kind]}{kept}\n{detail or ''}".strip())
            self.problem.setToolTip(st.error or "")
            self.problem.show()
        else:
            self.problem.hide()
        s = st.state
        self.pause.setVisible(s in (JobState.RUNNING, JobState.QUEUED))
        self.resume.setVisible(s in (JobState.PAUSED, JobState.FAILED))
        self.resume.setText(
            "Retry" if s is JobState.FAILED and st.kind is FailureKind.CHECKSUM else "Resume"
        )
        self.cancel.setVisible(s not in (JobState.DONE, JobState.CANCELLED))
        self.load.setVisible(s is JobState.DONE and bool(st.paths))
        self.clear.setVisible(s in (JobState.DONE, JobState.CANCELLED))


class DownloadsTab(QWidget):
    """Every download of this session and the unfinished ones of earlier sessions."""

    pause_requested = Signal(str)
    resume_requested = Signal(str)
    cancel_requested = Signal(str)
    load_requested = Signal(str)
    clear_requested = Signal(str)
    discover_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("page")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 12, 0, 0)
        lay.setSpacing(10)
        self.summary = QLabel("")
        self.summary.setObjectName("hint")
        lay.addWidget(self.summary)
        self.list_area = QScrollArea()
        self.list_area.setWidgetResizable(True)
        body = QWidget()
        body.setObjectName("page")
        self.rows_layout = QVBoxLayout(body)
        self.rows_layout.setContentsMargins(0, 0, 6, 0)
        self.rows_layout.setSpacing(8)
        self.rows_layout.addStretch(1)
        self.list_area.setWidget(body)
        lay.addWidget(self.list_area, 1)
        self.empty = QWidget()
        e = QVBoxLayout(self.empty)
        e.addStretch(1)
        hint = QLabel("No downloads yet.\nFind a model in Discover and press Download.")
        hint.setObjectName("emptyHint")
        hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        e.addWidget(hint)
        go = QPushButton("Discover models")
        go.clicked.connect(self.discover_requested)
        e.addWidget(go, 0, Qt.AlignmentFlag.AlignHCenter)
        e.addStretch(2)
        lay.addWidget(self.empty, 1)
        self.rows: dict[str, DownloadRow] = {}
        self._draw_summary()

    def set_status(self, st: DownloadStatus) -> None:
        row = self.rows.get(st.job_id)
        if row is None:
            row = DownloadRow(self, st)
            self.rows[st.job_id] = row
            self.rows_layout.insertWidget(self.rows_layout.count() - 1, row)
        else:
            row.draw(st)
        self._draw_summary()

    def remove(self, job_id: str) -> None:
        row = self.rows.pop(job_id, None)
        if row is not None:
            row.setParent(None)
            row.deleteLater()
        self._draw_summary()

    def active(self) -> int:
        """Downloads not finished (running, waiting, paused or failed)."""
        final = (JobState.DONE, JobState.CANCELLED)
        return sum(r.status.state not in final for r in self.rows.values())

    def _draw_summary(self) -> None:
        statuses = [r.status for r in self.rows.values()]
        running = [s for s in statuses if s.state is JobState.RUNNING]
        waiting = sum(s.state is JobState.QUEUED for s in statuses)
        failed = sum(s.state is JobState.FAILED for s in statuses)
        paused = sum(s.state is JobState.PAUSED for s in statuses)
        bits = []
        if running:
            speed = sum(s.speed for s in running)
            bits.append(f"{len(running)} downloading at {format_bytes(speed)}/s")
        if waiting:
            bits.append(f"{waiting} waiting")
        if paused:
            bits.append(f"{paused} paused")
        if failed:
            bits.append(f"{failed} failed")
        self.summary.setText(
            " · ".join(bits)
            or "Unfinished downloads resume when Peregrine starts again, from the bytes on disk."
        )
        self.list_area.setVisible(bool(statuses))
        self.empty.setVisible(not statuses)
