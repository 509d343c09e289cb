"""The download queue on disk, so an unfinished queue resumes on the next start.

One small JSON file (`downloads/queue.json`) lists every download that is not
finished: queued or running (resumed at the next start), paused (kept paused),
failed (kept, with its reason, until the user resumes or cancels it). The bytes
themselves stay in the partial files beside it; this file only says what to do
with them. It is written aside and renamed, so a crash never leaves half of it;
an unreadable one is moved aside (never deleted) and the queue starts empty.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.services.models.hub import check_file_name, check_repo_id, valid_size
from engine.errors import PeregrineError

log = logging.getLogger(__name__)

VERSION = 1
MAX_BYTES = 1 << 20
MAX_ENTRIES = 1000
STATES = frozenset({"queued", "running", "paused", "failed"})


@dataclass(frozen=True)
class QueuedDownload:
    """One unfinished download as it is kept between runs."""

    repo_id: str
    files: tuple[str, ...]
    revision: str | None
    state: str  # queued, running, paused or failed
    priority: int = 0
    done: int = 0
    total: int = 0
    error: str | None = None
    kind: str | None = None  # a FailureKind value for failed ones

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "files": list(self.files),
            "revision": self.revision,
            "state": self.state,
            "priority": self.priority,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "kind": self.kind,
        }


def _entry(raw: object) -> QueuedDownload:
    """A record from the file, checked as strictly as a hub answer (the file may be edited)."""
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    repo_id, files, state = raw.get("repo_id"), raw.get("files"), raw.get("state")
    if not isinstance(repo_id, str) or not isinstance(files, list) or not files:
        raise ValueError("no repo or files")
    check_repo_id(repo_id)
    for f in files:
        if not isinstance(f, str):
            raise ValueError("a file name is not text")
        check_file_name(repo_id, f)
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")
    revision = raw.get("revision")
    numbers = [raw.get(k, 0) for k in ("priority", "done", "total")]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise ValueError("priority, done and total must be integers")
    priority, done, total = numbers
    if not (valid_size(done) and valid_size(total)):
        raise ValueError("impossible sizes")
    error, kind = raw.get("error"), raw.get("kind")
    return QueuedDownload(
        repo_id,
        tuple(files),
        revision if isinstance(revision, str) and revision else None,
        state,
        priority,
        done,
        total,
        error if isinstance(error, str) else None,
        kind if isinstance(kind, str) else None,
    )


class QueueFile:
    """Reads and writes the queue's JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[QueuedDownload]:
        """The saved queue; [] when there is none. Bad entries are skipped, a bad file moved aside."""
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot read the download queue %s: %s", self.path, exc)
            return []
        try:
            # read_bytes() on a FIFO would wait forever: only a small regular file is read.
            if not stat.S_ISREG(mode):
                raise ValueError("not a regular file")
            if self.path.stat().st_size > MAX_BYTES:
                raise ValueError("larger than 1 MiB")
            data = json.loads(self.path.read_bytes())
            if not isinstance(data, dict) or not isinstance(data.get("downloads"), list):
                raise ValueError("no list of downloads")
        except (OSError, ValueError) as exc:
            self._move_aside(str(exc))
            return []
        out = []
        for raw in data["downloads"][:MAX_ENTRIES]:
            try:
                out.append(_entry(raw))
            except (ValueError, PeregrineError) as exc:
                log.warning("skipping a download in %s: %s", self.path, exc)
        return out

    def save(self, downloads: list[QueuedDownload]) -> None:
        """Writes the queue aside and renames it into place (a crash keeps the old or the new)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"version": VERSION, "downloads": [d.to_json() for d in downloads]}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.path)

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("the download queue %s is unreadable (%s); moved to %s", self.path, why, aside)
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            log.warning("could not move %s aside: %s", self.path, exc)
