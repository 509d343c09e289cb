"""Downloads that never lose a byte: resumable, SHA-256 verified, moved into place atomically.

huggingface-hub 2.4.0 resumes only inside one call and never checks the LFS
SHA-256 (ENGINE_NOTES.md, measured), so Peregrine keeps its own partial file
per (repo, commit, file) under `downloads/`, with a JSON sidecar of what the
bytes must hash to. The hub's metadata call gives the sha256, size, pinned
commit and CDN location; its `http_get(..., resume_size=...)` moves the bytes.
A file becomes a model only after its hash matches and `os.replace` put it in
`models/<owner--name>/`.

`Downloader` does one model (all parts of a split GGUF) synchronously;
`DownloadQueue` runs several on worker threads with pause, resume, cancel and
priority, and reports progress as plain data.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, cast

from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from app.services.hub import access_error, default_endpoint
from engine.errors import PeregrineError
from engine.paths import Paths

log = logging.getLogger(__name__)

DEFAULT_DISK_MARGIN = 512 * 1024 * 1024
# http_get hands over the body in chunks of huggingface-hub's DOWNLOAD_CHUNK_SIZE
# (10 MiB): too coarse for 10 Hz progress, a prompt pause, and too much held in
# memory (lost) when the process is killed. It reads the constant per call.
TRANSFER_CHUNK = 256 * 1024
_HASH_CHUNK = 1 << 20

OpenWriter = Callable[[Path], BinaryIO]
DiskFree = Callable[[Path], int]
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total) for the whole model
StopFn = Callable[[], "str | None"]  # "pause", "cancel" or None
NoticeFn = Callable[[str], None]


class DownloadError(PeregrineError):
    """A download failed; the message says why and what is kept."""


class ChecksumError(DownloadError):
    """The bytes did not hash to the hub's LFS SHA-256; they were deleted."""


class DiskFullError(DownloadError):
    """Not enough disk space, before or during a transfer."""


class DownloadInterrupted(Exception):
    """A pause or cancel request stopped the transfer (not an error)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def repo_folder(repo_id: str) -> str:
    """A repo id as one folder name ("owner/name" -> "owner--name"; the hub forbids "--" in ids)."""
    return repo_id.replace("/", "--")


def _open_append(path: Path) -> BinaryIO:
    return path.open("ab")


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    """A size for people: "98.4 MB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass(frozen=True)
class RemoteTarget:
    """One file to fetch, pinned to a commit, with the hash its bytes must have."""

    repo_id: str
    path: str
    commit: str
    sha256: str
    size: int
    url: str  # where the bytes come from (the CDN location)


@dataclass(frozen=True)
class PendingDownload:
    """A partial file left on disk (paused, failed or interrupted), which a pull resumes."""

    repo_id: str
    path: str
    commit: str
    done: int
    size: int


class _HashingSink:
    """The file object handed to http_get: writes, hashes as it goes, reports, and obeys stop requests."""

    def __init__(
        self,
        fh: BinaryIO,
        hasher: Any,
        on_bytes: Callable[[int], None],
        should_stop: StopFn,
    ) -> None:
        self._fh = fh
        self.hasher = hasher
        self._on_bytes = on_bytes
        self._should_stop = should_stop

    def write(self, data: bytes) -> int:
        kind = self._should_stop()
        if kind:
            raise DownloadInterrupted(kind)
        n = self._fh.write(data)
        self.hasher.update(data)
        self._on_bytes(len(data))
        return n if n is not None else len(data)

    def tell(self) -> int:
        return self._fh.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        # http_get only seeks back to where the resume started, when a server
        # ignored the Range header and sent the whole file again.
        if pos != 0 or whence != 0:
            raise OSError(f"unexpected seek to {pos} in a partial download")
        self.hasher = hashlib.sha256()
        self._on_bytes(-self._fh.tell())
        return self._fh.seek(0)

    def truncate(self, size: int | None = None) -> int:
        return self._fh.truncate(size)

    def flush(self) -> None:
        self._fh.flush()


class Downloader:
    """Fetches one model (one file, or every part of a split GGUF) into Peregrine's models folder."""

    def __init__(
        self,
        paths: Paths,
        endpoint: str | None = None,
        token: str | bool | None = None,
        *,
        open_writer: OpenWriter = _open_append,
        disk_free: DiskFree = _disk_free,
        disk_margin: int = DEFAULT_DISK_MARGIN,
        metadata_fn: Callable[..., Any] = get_hf_file_metadata,
        http_get_fn: Callable[..., None] = http_get,
    ) -> None:
        self.paths = paths
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        self.token = token
        self._open_writer = open_writer
        self._disk_free = disk_free
        self._margin = disk_margin
        self._metadata = metadata_fn
        self._http_get = http_get_fn

    # --- locations ------------------------------------------------------------------
    def final_path(self, repo_id: str, path: str) -> Path:
        """Where a verified file lives: models/<owner--name>/<file>."""
        return self.paths.models / repo_folder(repo_id) / path

    def _stem(self, repo_id: str, commit: str, path: str) -> str:
        return f"{repo_folder(repo_id)}--{commit[:12]}--{path.replace('/', '__')}"

    def partial_path(self, target: RemoteTarget) -> Path:
        """Peregrine's partial file for a target; a restart finds it by name."""
        return self.paths.downloads / (
            self._stem(target.repo_id, target.commit, target.path) + ".part"
        )

    @staticmethod
    def _sidecar(partial: Path) -> Path:
        return partial.with_suffix(".json")

    # --- metadata -------------------------------------------------------------------
    def resolve(self, repo_id: str, path: str, revision: str | None = None) -> RemoteTarget:
        """Asks the hub for a file's sha256, size, commit and location."""
        url = hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)
        try:
            meta = self._metadata(url, token=self.token, endpoint=self.endpoint)
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise DownloadError(f"{repo_id} has no file {path}") from exc
            raise access_error(repo_id, exc, bool(self.token)) from exc
        except OSError as exc:
            raise DownloadError(
                f"could not reach Hugging Face for {repo_id}/{path}: {exc}"
            ) from exc
        sha = (meta.etag or "").lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise DownloadError(
                f"{repo_id}/{path} has no LFS SHA-256 on the hub, so it cannot be verified"
            )
        if not meta.commit_hash or meta.size is None:
            raise DownloadError(f"the hub gave no commit or size for {repo_id}/{path}")
        return RemoteTarget(repo_id, path, meta.commit_hash, sha, int(meta.size), meta.location)

    # --- partial bookkeeping -------------------------------------------------------------
    def _read_sidecar(self, sidecar: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable download sidecar %s: %s", sidecar, exc)
            return None
        return data if isinstance(data, dict) else None

    def _prepare_partial(self, target: RemoteTarget, notice: NoticeFn) -> Path:
        """The partial to continue; partials of other content for the same file are dropped, saying so."""
        partial = self.partial_path(target)
        pattern = f"{repo_folder(target.repo_id)}--*--{target.path.replace('/', '__')}.json"
        for sidecar in self.paths.downloads.glob(pattern):
            data = self._read_sidecar(sidecar)
            if (
                data is None
                or data.get("repo_id") != target.repo_id
                or data.get("path") != target.path
            ):
                continue
            old_partial = sidecar.with_suffix(".part")
            if data.get("sha256") == target.sha256 and data.get("size") == target.size:
                if old_partial != partial and old_partial.exists():
                    # Same bytes under a newer commit: keep them, rename to the new pin.
                    os.replace(old_partial, partial)
                    sidecar.unlink()
                continue
            notice(
                f"{target.path} changed on the hub since the partial download "
                f"(sha256 {str(data.get('sha256'))[:12]}… -> {target.sha256[:12]}…); starting over"
            )
            old_partial.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        sidecar = self._sidecar(partial)
        previous = self._read_sidecar(sidecar) if sidecar.exists() else None
        record = {
            "repo_id": target.repo_id,
            "path": target.path,
            "commit": target.commit,
            "sha256": target.sha256,
            "size": target.size,
            "url": target.url,
            "verified": bool(previous and previous.get("verified")),
        }
        sidecar.write_text(json.dumps(record, indent=1))
        return partial

    def _mark_verified(self, partial: Path) -> None:
        sidecar = self._sidecar(partial)
        data = self._read_sidecar(sidecar) or {}
        data["verified"] = True
        sidecar.write_text(json.dumps(data, indent=1))

    def _is_verified(self, partial: Path, target: RemoteTarget) -> bool:
        data = self._read_sidecar(self._sidecar(partial))
        return bool(
            data
            and data.get("verified")
            and partial.exists()
            and partial.stat().st_size == target.size
        )

    def pending(self) -> list[PendingDownload]:
        """Partial downloads on disk, so the app can offer to resume them after a restart."""
        found = []
        for sidecar in sorted(self.paths.downloads.glob("*.json")):
            data = self._read_sidecar(sidecar)
            if not data or not {"repo_id", "path", "commit", "size"} <= data.keys():
                continue
            partial = sidecar.with_suffix(".part")
            done = partial.stat().st_size if partial.exists() else 0
            found.append(
                PendingDownload(
                    data["repo_id"], data["path"], data["commit"], done, int(data["size"])
                )
            )
        return found

    def discard(self, repo_id: str, files: Sequence[str]) -> None:
        """Deletes every partial (and sidecar) of these files, whatever commit they were pinned to."""
        for path in files:
            pattern = f"{repo_folder(repo_id)}--*--{path.replace('/', '__')}"
            for leftover in itertools.chain(
                self.paths.downloads.glob(pattern + ".part"),
                self.paths.downloads.glob(pattern + ".json"),
            ):
                leftover.unlink(missing_ok=True)

    # --- the transfer -------------------------------------------------------------------
    def download_model(
        self,
        repo_id: str,
        files: Sequence[str],
        revision: str | None = None,
        *,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        on_notice: NoticeFn | None = None,
    ) -> list[Path]:
        """Downloads, verifies and places every file; returns their final paths.

        Raises DownloadInterrupted on pause (partials kept) or cancel (partials deleted).
        """
        if not files:
            raise DownloadError(f"nothing to download from {repo_id}")
        self.paths.downloads.mkdir(parents=True, exist_ok=True)
        progress = on_progress or (lambda done, total: None)
        stop = should_stop or (lambda: None)
        notice = on_notice or (lambda msg: log.info("%s", msg))

        # Pin every file to the commit the first answer names, so parts never mix revisions.
        first = self.resolve(repo_id, files[0], revision)
        targets = [first] + [self.resolve(repo_id, f, first.commit) for f in files[1:]]
        finals = [self.final_path(repo_id, t.path) for t in targets]
        if all(
            p.exists() and p.stat().st_size == t.size for p, t in zip(finals, targets, strict=True)
        ):
            log.info("%s is already downloaded", repo_id)
            progress(sum(t.size for t in targets), sum(t.size for t in targets))
            return finals

        partials = [self._prepare_partial(t, notice) for t in targets]
        total = sum(t.size for t in targets)
        have = [p.stat().st_size if p.exists() else 0 for p in partials]
        self._check_disk(repo_id, total - sum(have))
        if 0 < sum(have) < total:
            notice(f"resuming: {format_bytes(sum(have))} of {format_bytes(total)} already on disk")

        done_before = 0
        try:
            for target, partial in zip(targets, partials, strict=True):
                if not self._is_verified(partial, target):
                    self._transfer(target, partial, done_before, total, progress, stop)
                done_before += target.size
        except DownloadInterrupted as exc:
            if exc.kind == "cancel":
                self.discard(repo_id, [t.path for t in targets])
            raise
        progress(total, total)
        for partial, final in zip(partials, finals, strict=True):
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
            self._sidecar(partial).unlink(missing_ok=True)
            _fsync_dir(final.parent)
        return finals

    def _check_disk(self, repo_id: str, needed: int) -> None:
        free = self._disk_free(self.paths.downloads)
        if free < needed + self._margin:
            raise DiskFullError(
                f"not enough free disk space for {repo_id}: it needs {format_bytes(needed)} "
                f"plus a {format_bytes(self._margin)} margin, and {self.paths.downloads} has "
                f"{format_bytes(free)} free"
            )

    def _transfer(
        self,
        target: RemoteTarget,
        partial: Path,
        done_before: int,
        total: int,
        progress: ProgressFn,
        stop: StopFn,
    ) -> None:
        # Re-hash what is already on disk once, so the final digest covers every byte.
        hasher = hashlib.sha256()
        resume = 0
        if partial.exists():
            with partial.open("rb") as existing:
                while chunk := existing.read(_HASH_CHUNK):
                    hasher.update(chunk)
                    resume += len(chunk)
        if resume > target.size:
            # More bytes than the file has: they cannot be right.
            partial.unlink()
            hasher, resume = hashlib.sha256(), 0
        done = done_before + resume
        progress(done, total)

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        headers = build_hf_headers(token=self.token)
        if hf_constants.DOWNLOAD_CHUNK_SIZE > TRANSFER_CHUNK:
            hf_constants.DOWNLOAD_CHUNK_SIZE = TRANSFER_CHUNK
        fh = self._open_writer(partial)
        sink = _HashingSink(fh, hasher, on_bytes, stop)
        try:
            fh.seek(0, os.SEEK_END)
            if resume < target.size:
                self._http_get(
                    target.url,
                    cast(BinaryIO, sink),
                    resume_size=resume,
                    headers=headers,
                    expected_size=target.size,
                    displayed_filename=target.path,
                )
            fh.flush()
            os.fsync(fh.fileno())
        except DownloadInterrupted:
            raise
        except HfHubHTTPError as exc:
            raise access_error(target.repo_id, exc, bool(self.token)) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk filled up while downloading {target.path}; the partial file is "
                    f"kept in {partial.parent}: free some space and pull again to resume"
                ) from exc
            raise DownloadError(
                f"downloading {target.path} failed ({_one_line(exc)}); "
                "the partial file is kept: pull again to resume"
            ) from exc
        except Exception as exc:
            # httpx errors after http_get's own retries: the bytes on disk stay for a resume.
            raise DownloadError(
                f"downloading {target.path} failed ({type(exc).__name__}: {_one_line(exc)}); "
                "the partial file is kept: pull again to resume"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                # A full disk can make the final flush fail too; the bytes written so far stay.
                fh.close()

        got = sink.hasher.hexdigest()
        if got != target.sha256:
            partial.unlink(missing_ok=True)
            self._sidecar(partial).unlink(missing_ok=True)
            raise ChecksumError(
                f"{target.path} is corrupt: SHA-256 mismatch (expected {target.sha256}, got {got}); "
                "the bad download was deleted"
            )
        self._mark_verified(partial)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows.
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the queue ----------------------------------------------------------------------------


class JobState(StrEnum):
    """Where a queued download stands."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class DownloadStatus:
    """A job's progress as plain data (what the GUI draws and the CLI prints)."""

    job_id: str
    repo_id: str
    files: tuple[str, ...]
    state: JobState
    priority: int
    done: int = 0
    total: int = 0
    speed: float = 0.0  # bytes per second, over the last few seconds
    eta: float | None = None  # seconds left at that speed
    error: str | None = None
    paths: tuple[Path, ...] = ()


class SpeedMeter:
    """Bytes per second over a sliding window, from an injected clock."""

    def __init__(self, clock: Callable[[], float], window: float = 3.0) -> None:
        self._clock = clock
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float:
        now = self._clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        return (done - d0) / (now - t0) if now > t0 and done >= d0 else 0.0

    def reset(self) -> None:
        self._samples.clear()


@dataclass
class _Job:
    status: DownloadStatus
    revision: str | None
    seq: int
    meter: SpeedMeter
    stop: str | None = None
    last_emit: float = field(default=-1e9)


class DownloadQueue:
    """Several downloads on worker threads: pause, resume, cancel, priority, throttled progress.

    The listener is called from worker threads with a DownloadStatus at most
    about every `interval` seconds per job, and always on a state change; the
    Qt layer re-emits it as a signal on the GUI thread.
    """

    def __init__(
        self,
        downloader: Downloader,
        *,
        workers: int = 2,
        listener: Callable[[DownloadStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self._downloader = downloader
        self._listener = listener
        self._clock = clock
        self._interval = interval
        self._jobs: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._work, name=f"peregrine-download-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # --- intents ------------------------------------------------------------------------
    def add(
        self, repo_id: str, files: Sequence[str], revision: str | None = None, priority: int = 0
    ) -> str:
        """Queues a model (all its files) and returns the job id."""
        seq = next(self._seq)
        job_id = f"dl-{seq}"
        status = DownloadStatus(job_id, repo_id, tuple(files), JobState.QUEUED, priority)
        with self._cond:
            self._jobs[job_id] = _Job(status, revision, seq, SpeedMeter(self._clock))
            self._cond.notify_all()
        self._emit(status)
        return job_id

    def pause(self, job_id: str) -> None:
        """Stops a job and keeps its partial files; `resume` continues from them."""
        self._request(job_id, "pause")

    def cancel(self, job_id: str) -> None:
        """Stops a job and deletes its partial files."""
        self._request(job_id, "cancel")

    def resume(self, job_id: str) -> None:
        """Puts a paused or failed job back in the queue."""
        with self._cond:
            job = self._jobs[job_id]
            if job.status.state not in (JobState.PAUSED, JobState.FAILED):
                return
            job.stop = None
            job.meter.reset()
            status = job.status = replace(job.status, state=JobState.QUEUED, error=None, speed=0.0)
            self._cond.notify_all()
        self._emit(status)

    def set_priority(self, job_id: str, priority: int) -> None:
        """Higher priority jobs start first (running ones are not preempted)."""
        with self._cond:
            job = self._jobs[job_id]
            status = job.status = replace(job.status, priority=priority)
        self._emit(status)

    def status(self, job_id: str) -> DownloadStatus:
        with self._cond:
            return self._jobs[job_id].status

    def statuses(self) -> list[DownloadStatus]:
        with self._cond:
            return [j.status for j in self._jobs.values()]

    def wait(
        self, job_id: str, states: frozenset[JobState] = FINAL_STATES, timeout: float | None = None
    ) -> DownloadStatus:
        """Blocks until the job reaches one of `states` (or the timeout passes)."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs[job_id].status.state in states, timeout)
            return self._jobs[job_id].status

    def close(self, timeout: float = 10.0) -> None:
        """Pauses running jobs (keeping partials) and stops the workers."""
        with self._cond:
            self._closing = True
            for job in self._jobs.values():
                if job.status.state is JobState.RUNNING:
                    job.stop = "pause"
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # --- internals ----------------------------------------------------------------------
    def _request(self, job_id: str, kind: str) -> None:
        discard = False
        with self._cond:
            job = self._jobs[job_id]
            state = job.status.state
            if state in FINAL_STATES and not (kind == "cancel" and state is JobState.FAILED):
                return
            if state is JobState.RUNNING:
                job.stop = kind  # the worker stops at the next chunk
                return
            new_state = JobState.PAUSED if kind == "pause" else JobState.CANCELLED
            if kind == "pause" and state is JobState.FAILED:
                return
            discard = kind == "cancel"
            status = job.status = replace(job.status, state=new_state, speed=0.0, eta=None)
            self._cond.notify_all()
        if discard:
            self._downloader.discard(status.repo_id, status.files)
        self._emit(status)

    def _next_job(self) -> _Job | None:
        with self._cond:
            while True:
                if self._closing:
                    return None
                queued = [j for j in self._jobs.values() if j.status.state is JobState.QUEUED]
                if queued:
                    job = max(queued, key=lambda j: (j.status.priority, -j.seq))
                    job.stop = None
                    job.status = replace(job.status, state=JobState.RUNNING)
                    status = job.status
                    break
                self._cond.wait()
        self._emit(status)
        return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            self._run(job)

    def _run(self, job: _Job) -> None:
        st = job.status

        def on_progress(done: int, total: int) -> None:
            with self._cond:
                speed = job.meter.add(done)
                eta = (total - done) / speed if speed > 0 else None
                status = job.status = replace(
                    job.status, done=done, total=total, speed=speed, eta=eta
                )
                now = self._clock()
                due = now - job.last_emit >= self._interval or done >= total
                if due:
                    job.last_emit = now
            if due:
                self._emit(status)

        def should_stop() -> str | None:
            return job.stop

        try:
            paths = self._downloader.download_model(
                st.repo_id, st.files, job.revision, on_progress=on_progress, should_stop=should_stop
            )
            self._finish(job, JobState.DONE, paths=tuple(paths))
        except DownloadInterrupted as exc:
            self._finish(job, JobState.PAUSED if exc.kind == "pause" else JobState.CANCELLED)
        except PeregrineError as exc:
            self._finish(job, JobState.FAILED, error=str(exc))
        except Exception as exc:
            # A bug, not a user error: keep the traceback in the log and show the job failed.
            log.exception("download %s of %s crashed", job.status.job_id, st.repo_id)
            self._finish(job, JobState.FAILED, error=f"{type(exc).__name__}: {exc}")

    def _finish(
        self, job: _Job, state: JobState, *, error: str | None = None, paths: tuple[Path, ...] = ()
    ) -> None:
        with self._cond:
            status = job.status = replace(
                job.status, state=state, error=error, paths=paths, speed=0.0, eta=None
            )
            self._cond.notify_all()
        self._emit(status)

    def _emit(self, status: DownloadStatus) -> None:
        if self._listener is None:
            return
        try:
            self._listener(status)
        except Exception:
            # A broken listener must not kill the download; its traceback goes to the log.
            log.exception("download listener failed")
