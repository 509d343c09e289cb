"""Downloads that never lose a byte: resumable, SHA-256 verified, moved into place atomically.

huggingface-hub 2.4.0 resumes only inside one call and never checks the LFS
SHA-256 (measured against a loopback hub), so Peregrine keeps its own partial file
per (repo, commit, file) under `downloads/`, with a JSON sidecar of what the
bytes must hash to. The hub's metadata call gives the sha256, size, pinned
commit and CDN location. A file becomes a model only after its hash matches
and `os.replace` put it in `models/<owner--name>/`.

The bytes move through Peregrine's own ranged GET rather than huggingface-hub's
`http_get`: against faulty servers that one retries 5xx on the CDN not at all,
sleeps a fixed second, takes its timeout from a process-wide constant, never
checks Content-Range, and would write past the expected size. Here every
answer is checked (status, Content-Range, Content-Length, redirects), transient
failures are retried with backoff from the bytes on disk, and the timeout and
the sleep are injected so tests of stalls and retries run fast.

`Downloader` does one model (all parts of a split GGUF) synchronously;
`DownloadQueue` runs several on worker threads with pause, resume, cancel and
priority, and reports progress as plain data.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from app.services.models.hub import (
    RETRY_STATUSES,
    Backoff,
    HubAccessError,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    access_error,
    check_file_name,
    check_repo_id,
    default_endpoint,
    default_retry_policy,
    one_line,
    parse_retry_after,
    transient_failure,
    valid_commit,
    valid_sha256,
    valid_size,
)
from app.services.models.hub import (
    SPLIT_RE as SPLIT_SUFFIX,
)
from app.services.models.queue_file import QueuedDownload, QueueFile
from engine.errors import PeregrineError
from engine.paths import Paths

log = logging.getLogger(__name__)

DEFAULT_DISK_MARGIN = 512 * 1024 * 1024
MAX_REDIRECTS = 10
_HASH_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes\s+\*/(\d+)$")
_KEPT = "; the partial file is kept: pull again to resume"

OpenWriter = Callable[[Path], BinaryIO]
DiskFree = Callable[[Path], int]
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total) for the whole model


class StopKind(StrEnum):
    """Why a transfer is asked to stop: its partial file is kept (pause) or removed (cancel)."""

    PAUSE = "pause"
    CANCEL = "cancel"


StopFn = Callable[[], "StopKind | None"]
NoticeFn = Callable[[str], None]
ClientFactory = Callable[[RetryPolicy], httpx2.Client]


class FailureKind(StrEnum):
    """What a failed download ran into, so the app can say it plainly and offer the way out."""

    NETWORK = "network"  # no connection, or no answer in time
    ACCESS = "access"  # a gated or private repo: a licence to accept, a token to set
    NOT_FOUND = "not_found"  # the repo, revision or file is not on the hub
    DISK_FULL = "disk_full"
    CHECKSUM = "checksum"  # the bytes did not hash to the hub's SHA-256
    SERVER = "server"  # server errors after retries, or answers that make no sense
    OTHER = "other"


class DownloadError(PeregrineError):
    """A download failed; the message says why and what is kept."""

    kind = FailureKind.OTHER

    def __init__(self, message: str, kind: FailureKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class ChecksumError(DownloadError):
    """The bytes did not hash to the hub's LFS SHA-256; they were deleted."""

    kind = FailureKind.CHECKSUM


class DiskFullError(DownloadError):
    """Not enough disk space, before or during a transfer."""

    kind = FailureKind.DISK_FULL


def failure_kind(exc: BaseException) -> FailureKind:
    """Sorts a download's failure into what the user can do about it."""
    if isinstance(exc, DownloadError):
        return exc.kind
    if isinstance(exc, RetriesExhausted):
        failure = exc.failure
        return (
            FailureKind.NETWORK if failure is not None and failure.network else FailureKind.SERVER
        )
    if isinstance(exc, HubAccessError):
        if exc.gated or exc.status in (401, 403):
            return FailureKind.ACCESS
        return FailureKind.NOT_FOUND
    return FailureKind.OTHER


class DownloadInterrupted(Exception):
    """A pause or cancel request stopped the transfer (not an error)."""

    def __init__(self, kind: StopKind) -> None:
        super().__init__(kind.value)
        self.kind = kind


class _Retry(Exception):
    """One attempt of a transfer failed in a way worth retrying from the bytes on disk."""

    def __init__(self, failure: Transient) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def repo_folder(repo_id: str) -> str:
    """A repo id as one folder name ("owner/name" -> "owner--name"; the hub forbids "--" in ids)."""
    return repo_id.replace("/", "--")


def _open_append(path: Path) -> BinaryIO:
    return path.open("ab")


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _default_client(policy: RetryPolicy) -> httpx2.Client:
    # Redirects are followed by hand, so each hop's scheme is checked and loops are named.
    return httpx2.Client(timeout=policy.httpx_timeout(), follow_redirects=False)


def format_bytes(n: float) -> str:
    """A size for people: "98.4 MB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _check_scheme(url: str, what: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"{what} points to {one_line(url, 120)!r}, which is not an http(s) address; "
            "Peregrine does not follow it"
        )


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


class _Sink:
    """The open partial file: appends, hashes as it goes, reports progress, and obeys stop requests."""

    def __init__(
        self,
        fh: BinaryIO,
        hasher: Any,
        offset: int,
        on_bytes: Callable[[int], None],
        should_stop: StopFn,
    ) -> None:
        self._fh = fh
        self.hasher = hasher
        self.offset = offset  # bytes of the file on disk (and hashed)
        # False once the server answered a Range request wrongly: from then on the
        # whole file is asked for and the bytes already on disk are skipped.
        self.use_range = True
        self._on_bytes = on_bytes
        self._should_stop = should_stop

    def check_stop(self) -> None:
        kind = self._should_stop()
        if kind:
            raise DownloadInterrupted(kind)

    def write(self, data: bytes) -> None:
        self.check_stop()
        self._fh.write(data)
        self.hasher.update(data)
        self.offset += len(data)
        self._on_bytes(len(data))

    def restart(self) -> None:
        """Drops every byte: the next write is byte 0 of the file."""
        self._fh.seek(0)
        self._fh.truncate(0)
        self._on_bytes(-self.offset)
        self.hasher = hashlib.sha256()
        self.offset = 0

    def finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())


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
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        client_factory: ClientFactory = _default_client,
        models_dir: Path | None = None,
        downloads_dir: Path | None = None,
    ) -> None:
        self.paths = paths
        # A models folder from settings keeps its partial files beside it (same disk,
        # so the final rename stays atomic); by default both live in the data folder.
        self.models_dir = models_dir or paths.models
        self.downloads_dir = downloads_dir or paths.downloads
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        self.token = token
        self.retry = retry or default_retry_policy()
        self._open_writer = open_writer
        self._disk_free = disk_free
        self._margin = disk_margin
        self._metadata = metadata_fn
        self._sleep = sleep
        self._client_factory = client_factory

    # --- locations ------------------------------------------------------------------
    def final_path(self, repo_id: str, path: str) -> Path:
        """Where a verified file lives: models/<owner--name>/<file>, never anywhere else."""
        check_repo_id(repo_id)
        check_file_name(repo_id, path)
        root = self.models_dir
        final = root / repo_folder(repo_id) / path
        # Belt and braces after the name checks: a symlinked folder must not lead out either.
        if not final.resolve().is_relative_to(root.resolve()):
            raise DownloadError(f"refusing {repo_id}/{path}: it would land outside {root}")
        return final

    def _stem(self, repo_id: str, commit: str, path: str) -> str:
        return f"{repo_folder(repo_id)}--{commit[:12]}--{path.replace('/', '__')}"

    def partial_path(self, target: RemoteTarget) -> Path:
        """Peregrine's partial file for a target; a restart finds it by name."""
        return self.downloads_dir / (
            self._stem(target.repo_id, target.commit, target.path) + ".part"
        )

    @staticmethod
    def _sidecar(partial: Path) -> Path:
        return partial.with_suffix(".json")

    def _partials_of(self, repo_id: str, path: str, suffix: str) -> list[Path]:
        # File names may hold glob characters ("[", "*"): escape them, or a cancel
        # of one file could delete another's partial.
        pattern = (
            glob.escape(f"{repo_folder(repo_id)}--")
            + "*"
            + glob.escape(f"--{path.replace('/', '__')}{suffix}")
        )
        return sorted(self.downloads_dir.glob(pattern))

    # --- metadata -------------------------------------------------------------------
    def resolve(
        self,
        repo_id: str,
        path: str,
        revision: str | None = None,
        *,
        notice: NoticeFn | None = None,
    ) -> RemoteTarget:
        """Asks the hub for a file's sha256, size, commit and location, and refuses answers that make no sense."""
        check_repo_id(repo_id)
        check_file_name(repo_id, path)
        url = hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)
        what = f"asking Hugging Face about {repo_id}/{path}"
        backoff = Backoff(self.retry, what, sleep=self._sleep, notice=notice)
        try:
            meta = backoff.call(
                lambda: self._metadata(
                    url, token=self.token, endpoint=self.endpoint, timeout=self.retry.timeout
                )
            )
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 404:
                raise DownloadError(f"{repo_id} has no file {path}", FailureKind.NOT_FOUND) from exc
            raise access_error(repo_id, exc, bool(self.token)) from exc
        except httpx2.TooManyRedirects as exc:
            raise DownloadError(
                f"Hugging Face sent {repo_id}/{path} round a redirect loop; try again later",
                FailureKind.SERVER,
            ) from exc
        except (httpx2.HTTPError, OSError) as exc:
            raise DownloadError(
                f"could not reach Hugging Face for {repo_id}/{path}: {one_line(exc)}",
                FailureKind.NETWORK,
            ) from exc
        sha = (meta.etag or "").lower()
        if not valid_sha256(sha):
            raise DownloadError(
                f"{repo_id}/{path} has no LFS SHA-256 on the hub, so it cannot be verified",
                FailureKind.SERVER,
            )
        if not meta.commit_hash or meta.size is None:
            raise DownloadError(f"the hub gave no commit or size for {repo_id}/{path}")
        if not valid_commit(meta.commit_hash):
            raise DownloadError(
                f"the hub gave an unreadable commit id for {repo_id}/{path}: "
                f"{one_line(str(meta.commit_hash), 60)!r}",
                FailureKind.SERVER,
            )
        if not valid_size(meta.size) or meta.size == 0:
            raise DownloadError(
                f"the hub reports an impossible size for {repo_id}/{path}: {meta.size}",
                FailureKind.SERVER,
            )
        location = urljoin(url, meta.location or url)
        _check_scheme(location, f"the hub's download address for {repo_id}/{path}")
        return RemoteTarget(repo_id, path, meta.commit_hash, sha, int(meta.size), location)

    # --- partial bookkeeping -------------------------------------------------------------
    def _read_sidecar(self, sidecar: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable download sidecar %s: %s", sidecar, exc)
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _write_sidecar(sidecar: Path, record: dict[str, Any]) -> None:
        # Written aside and renamed, so a crash never leaves half a record.
        tmp = sidecar.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, sidecar)

    def _prepare_partial(self, target: RemoteTarget, notice: NoticeFn) -> Path:
        """The partial to continue; partials of other content for the same file are dropped, saying so."""
        partial = self.partial_path(target)
        for sidecar in self._partials_of(target.repo_id, target.path, ".json"):
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
        if partial.exists() and (
            previous is None
            or previous.get("sha256") != target.sha256
            or previous.get("size") != target.size
        ):
            # Bytes whose record is lost or torn may belong to another version: never mix them in.
            notice(f"a partial download of {target.path} has no usable record; starting over")
            partial.unlink()
            previous = None
        record = {
            "repo_id": target.repo_id,
            "path": target.path,
            "commit": target.commit,
            "sha256": target.sha256,
            "size": target.size,
            "url": target.url,
            "verified": bool(previous and previous.get("verified")),
        }
        self._write_sidecar(sidecar, record)
        return partial

    def _mark_verified(self, partial: Path) -> None:
        sidecar = self._sidecar(partial)
        data = self._read_sidecar(sidecar) or {}
        data["verified"] = True
        self._write_sidecar(sidecar, data)

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
        for sidecar in sorted(self.downloads_dir.glob("*.json")):
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
            for leftover in itertools.chain(
                self._partials_of(repo_id, path, ".part"),
                self._partials_of(repo_id, path, ".json"),
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
        check_repo_id(repo_id)
        for path in files:
            check_file_name(repo_id, path)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        progress = on_progress or (lambda done, total: None)
        stop = should_stop or (lambda: None)
        notice = on_notice or (lambda msg: log.info("%s", msg))

        # Pin every file to the commit the first answer names, so parts never mix revisions.
        first = self.resolve(repo_id, files[0], revision, notice=notice)
        targets = [first] + [
            self.resolve(repo_id, f, first.commit, notice=notice) for f in files[1:]
        ]
        finals = [self.final_path(repo_id, t.path) for t in targets]
        if all(
            p.exists() and p.stat().st_size == t.size for p, t in zip(finals, targets, strict=True)
        ):
            log.info("%s is already downloaded", repo_id)
            progress(sum(t.size for t in targets), sum(t.size for t in targets))
            return finals

        partials = [self._prepare_partial(t, notice) for t in targets]
        total = sum(t.size for t in targets)
        have = [
            min(p.stat().st_size, t.size) if p.exists() else 0
            for p, t in zip(partials, targets, strict=True)
        ]
        self._check_disk(repo_id, total - sum(have))
        if 0 < sum(have) < total:
            notice(f"resuming: {format_bytes(sum(have))} of {format_bytes(total)} already on disk")

        done_before = 0
        try:
            with self._client_factory(self.retry) as client:
                for target, partial in zip(targets, partials, strict=True):
                    if not self._is_verified(partial, target):
                        self._transfer(
                            client, target, partial, done_before, total, progress, stop, notice
                        )
                    done_before += target.size
        except DownloadInterrupted as exc:
            if exc.kind is StopKind.CANCEL:
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
        free = self._disk_free(self.downloads_dir)
        if free < needed + self._margin:
            raise DiskFullError(
                f"not enough free disk space for {repo_id}: it needs {format_bytes(needed)} "
                f"plus a {format_bytes(self._margin)} margin, and {self.downloads_dir} has "
                f"{format_bytes(free)} free"
            )

    def _transfer(
        self,
        client: httpx2.Client,
        target: RemoteTarget,
        partial: Path,
        done_before: int,
        total: int,
        progress: ProgressFn,
        stop: StopFn,
        notice: NoticeFn,
    ) -> None:
        # Re-hash what is already on disk once, so the final digest covers every byte.
        if partial.exists() and partial.stat().st_size > target.size:
            # More bytes than the file has: keep the first `size`; the hash decides if they are right.
            notice(
                f"the partial download of {target.path} is larger than the file "
                f"({format_bytes(partial.stat().st_size)} > {format_bytes(target.size)}); "
                "keeping its first bytes only"
            )
            os.truncate(partial, target.size)
        hasher = hashlib.sha256()
        resume = 0
        if partial.exists():
            with partial.open("rb") as existing:
                while chunk := existing.read(_HASH_CHUNK):
                    hasher.update(chunk)
                    resume += len(chunk)
        done = done_before + resume
        progress(done, total)

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)

        fh = self._open_writer(partial)
        sink = _Sink(fh, hasher, resume, on_bytes, stop)
        # Bytes from an earlier run may be wrong (a bad disk, a server that changed its
        # file under the same hash): if they do not verify, the file is fetched once more.
        retry_from_zero = resume > 0
        try:
            while True:
                self._fill(client, target, sink, notice)
                sink.finish()
                got = sink.hasher.hexdigest()
                if got == target.sha256:
                    break
                if retry_from_zero:
                    retry_from_zero = False
                    notice(
                        f"{target.path} did not verify with the bytes kept from an earlier "
                        "download; fetching it again from the start"
                    )
                    sink.restart()
                    continue
                fh.close()
                partial.unlink(missing_ok=True)
                self._sidecar(partial).unlink(missing_ok=True)
                raise ChecksumError(
                    f"{target.path} is corrupt: SHA-256 mismatch (expected {target.sha256}, "
                    f"got {got}); the bad download was deleted"
                )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk filled up while downloading {target.path}; the partial file is "
                    f"kept in {partial.parent}: free some space and pull again to resume"
                ) from exc
            raise DownloadError(f"writing {target.path} failed ({one_line(exc)}){_KEPT}") from exc
        finally:
            with contextlib.suppress(OSError):
                # A full disk can make the final flush fail too; the bytes written so far stay.
                fh.close()
        self._mark_verified(partial)

    def _fill(
        self, client: httpx2.Client, target: RemoteTarget, sink: _Sink, notice: NoticeFn
    ) -> None:
        """Appends to the partial until it holds `size` bytes, retrying transient failures."""
        # The waits go through _pause (not Backoff.call), so a pause or cancel is prompt.
        backoff = Backoff(
            self.retry,
            f"downloading {target.path}",
            notice=notice,
            kept=lambda: _KEPT if sink.offset else "",
        )
        while sink.offset < target.size:
            before = sink.offset
            try:
                self._fetch(client, target, sink, notice)
                if sink.offset < target.size:
                    raise _Retry(
                        Transient(
                            f"the server ended the answer at byte {sink.offset} of {target.size}"
                        )
                    )
            except _Retry as exc:
                failure = exc.failure
            except httpx2.TransportError as exc:
                found = transient_failure(exc)
                if found is None:
                    raise DownloadError(
                        f"downloading {target.path} failed ({type(exc).__name__}: "
                        f"{one_line(exc)}){_KEPT}",
                        FailureKind.NETWORK,
                    ) from exc
                failure = found
            else:
                continue  # the file is complete
            if sink.offset > before:
                backoff.progressed()
            self._pause(backoff.wait_before_retry(failure), sink)

    def _pause(self, seconds: float, sink: _Sink) -> None:
        # Waits in short steps so a pause or cancel during a backoff is prompt.
        remaining = seconds
        while remaining > 0:
            sink.check_stop()
            step = min(0.25, remaining)
            self._sleep(step)
            remaining -= step
        sink.check_stop()

    def _fetch(
        self, client: httpx2.Client, target: RemoteTarget, sink: _Sink, notice: NoticeFn
    ) -> None:
        """One GET from the bytes on disk on; redirects followed by hand; every answer checked."""
        hub_headers = build_hf_headers(token=self.token)
        url = target.url
        seen = {url}
        for _ in range(MAX_REDIRECTS + 1):
            headers = dict(hub_headers)
            if _origin(url) != _origin(self.endpoint):
                # The token is for the hub only, never for a CDN or whatever it redirects to.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            # Compression would make byte offsets meaningless for Range.
            headers["Accept-Encoding"] = "identity"
            if sink.offset and sink.use_range:
                headers["Range"] = f"bytes={sink.offset}-"
            with client.stream("GET", url, headers=headers) as response:
                if response.is_redirect:
                    location = response.headers.get("Location", "")
                    nxt = urljoin(url, location)
                    _check_scheme(nxt, f"the download server's redirect for {target.path}")
                    if nxt in seen:
                        raise DownloadError(
                            f"the download server sent {target.path} round a redirect loop "
                            f"({one_line(nxt, 120)}){_KEPT}",
                            FailureKind.SERVER,
                        )
                    seen.add(nxt)
                    url = nxt
                    continue
                self._read_body(response, target, sink, notice)
                return
        raise DownloadError(
            f"the download server redirected {target.path} more than {MAX_REDIRECTS} times{_KEPT}",
            FailureKind.SERVER,
        )

    def _stop_using_range(
        self, target: RemoteTarget, sink: _Sink, notice: NoticeFn, what: str
    ) -> NoReturn:
        """After a wrong answer to a resume: ask for the whole file from now on, skipping the bytes on disk."""
        if not sink.use_range:
            raise DownloadError(f"the download server {what} for {target.path}{_KEPT}")
        sink.use_range = False
        notice(
            f"the download server {what} for {target.path}; asking for the whole file "
            f"and skipping the {format_bytes(sink.offset)} already on disk"
        )
        raise _Retry(Transient(f"the download server {what}", retry_after=0.0))

    def _read_body(
        self, response: httpx2.Response, target: RemoteTarget, sink: _Sink, notice: NoticeFn
    ) -> None:
        status = response.status_code
        offset = sink.offset
        if status in RETRY_STATUSES:
            raise _Retry(
                Transient(
                    f"HTTP {status} from the download server",
                    parse_retry_after(response.headers.get("Retry-After")),
                )
            )
        if status == 416:
            unsatisfied = _UNSATISFIED_RANGE.match(response.headers.get("Content-Range", ""))
            if unsatisfied is not None and int(unsatisfied[1]) != target.size:
                raise DownloadError(
                    f"the download server cannot resume {target.path} at byte {offset} "
                    f"(HTTP 416: it has {unsatisfied[1]} bytes, the hub says {target.size}); "
                    f"the hub and its download server disagree, try again later{_KEPT}",
                    FailureKind.SERVER,
                )
            self._stop_using_range(target, sink, notice, "refused a valid resume (HTTP 416)")
        if status in (401, 403):
            raise DownloadError(
                f"the download server refused {target.path} (HTTP {status}); if the repo is "
                "gated or private, log in with `hf auth login` or set HF_TOKEN",
                FailureKind.ACCESS,
            )
        if status not in (200, 206):
            raise DownloadError(
                f"the download server answered HTTP {status} for {target.path}{_KEPT}",
                FailureKind.SERVER,
            )
        length = _int_header(response, "Content-Length")
        if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
            # Compressed despite "identity": the length counts compressed bytes, not the file's.
            length = None
        end = target.size  # one past the last byte this answer carries
        if status == 200:
            skip = offset
            if offset:
                # The server ignored Range and sends the whole file: the bytes on disk stay,
                # and the same number at the front of this answer are dropped.
                notice(
                    f"the download server ignored the resume request for {target.path}; "
                    f"skipping the {format_bytes(offset)} already on disk"
                )
            if length is not None and length != target.size:
                raise DownloadError(
                    f"the download server sent {length} bytes for {target.path}, but the hub "
                    f"says it has {target.size}; try again later{_KEPT}",
                    FailureKind.SERVER,
                )
        else:
            content_range = response.headers.get("Content-Range", "").strip()
            m = _CONTENT_RANGE.match(content_range)
            if m is None:
                self._stop_using_range(
                    target, sink, notice, "answered a resume without a readable Content-Range"
                )
            first, last, whole = int(m[1]), int(m[2]), m[3]
            if last >= target.size or (whole != "*" and int(whole) != target.size):
                raise DownloadError(
                    f"the download server sent bytes {first}-{last}/{whole} of {target.path}, "
                    f"but the hub says it has {target.size}; try again later{_KEPT}",
                    FailureKind.SERVER,
                )
            if (
                first > offset
                or last < first
                or (length is not None and length != last - first + 1)
            ):
                # A hole or a mismatch: these bytes cannot be placed; ask for the whole file.
                self._stop_using_range(
                    target, sink, notice, f"sent bytes {first}-{last} when asked for {offset}-"
                )
            skip = offset - first
            end = last + 1
        # Unbuffered: each network read is written at once, so progress is smooth, a pause
        # is prompt, and a cut or a killed process loses no byte that arrived.
        for chunk in response.iter_bytes():
            if skip:
                dropped = min(skip, len(chunk))
                chunk = chunk[dropped:]
                skip -= dropped
            room = end - sink.offset
            if len(chunk) > room:
                # More than the file has: keep what fits; the hash decides whether it is right.
                log.warning("the server sent more than %d bytes of %s", target.size, target.path)
                chunk = chunk[:room]
            if chunk:
                sink.write(chunk)
            if sink.offset >= end:
                return


def _int_header(response: httpx2.Response, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


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
    kind: FailureKind | None = None  # what a failed job ran into

    @property
    def name(self) -> str:
        """The model's file name (a split model's first part without its -0000N-of suffix)."""
        first = self.files[0].rsplit("/", 1)[-1] if self.files else self.repo_id
        return SPLIT_SUFFIX.sub(".gguf", first)


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
    stop: StopKind | None = None
    last_emit: float = field(default=-1e9)


# The downloader for the next transfer: built at each start, so a token or folder set in
# the meantime (after a "gated" failure, say) is the one a resume uses.
DownloaderSource = Downloader | Callable[[], Downloader]
_SAVED_STATES = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "running",
    JobState.PAUSED: "paused",
    JobState.FAILED: "failed",
}


class DownloadQueue:
    """Several downloads on worker threads: pause, resume, cancel, priority, throttled progress.

    The listener is called from worker threads with a DownloadStatus at most
    about every `interval` seconds per job, and always on a state change; the
    Qt layer re-emits it as a signal on the GUI thread. At most `workers`
    downloads run at once (`set_limit` changes it). With a `journal`, every
    unfinished download is kept on disk at each state change and restored by
    the next queue: queued and running ones start again from the bytes on disk,
    paused and failed ones wait for the user.
    """

    def __init__(
        self,
        downloader: DownloaderSource,
        *,
        workers: int = 2,
        listener: Callable[[DownloadStatus], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
        journal: QueueFile | None = None,
    ) -> None:
        self._downloader_source = downloader
        self._listener = listener
        self._clock = clock
        self._interval = interval
        self._jobs: dict[str, _Job] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._closing = False
        self._limit = max(1, workers)
        self._threads: list[threading.Thread] = []
        self._journal = journal
        self._journal_lock = threading.Lock()
        self._saved: dict[str, JobState] = {}
        if journal is not None:
            self._restore(journal)
        self._spawn()

    def _downloader(self) -> Downloader:
        source = self._downloader_source
        return source if isinstance(source, Downloader) else source()

    def _spawn(self) -> None:
        with self._cond:
            while len(self._threads) < self._limit:
                t = threading.Thread(
                    target=self._work, name=f"peregrine-download-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()

    # --- intents ------------------------------------------------------------------------
    def add(
        self, repo_id: str, files: Sequence[str], revision: str | None = None, priority: int = 0
    ) -> str:
        """Queues a model (all its files) and returns the job id.

        The same model already in the queue and not finished is not queued twice
        (two transfers would write one partial file): its job id is returned.
        """
        wanted = tuple(files)
        with self._cond:
            for job in self._jobs.values():
                st = job.status
                if (
                    st.repo_id == repo_id
                    and st.files == wanted
                    and st.state not in (JobState.DONE, JobState.CANCELLED)
                ):
                    return st.job_id
        return self._add(repo_id, wanted, revision, priority, JobState.QUEUED)

    def _add(
        self,
        repo_id: str,
        files: tuple[str, ...],
        revision: str | None,
        priority: int,
        state: JobState,
        **extra: Any,
    ) -> str:
        seq = next(self._seq)
        job_id = f"dl-{seq}"
        status = DownloadStatus(job_id, repo_id, files, state, priority, **extra)
        with self._cond:
            self._jobs[job_id] = _Job(status, revision, seq, SpeedMeter(self._clock))
            self._cond.notify_all()
        self._emit(status)
        return job_id

    def pause(self, job_id: str) -> None:
        """Stops a job and keeps its partial files; `resume` continues from them."""
        self._request(job_id, StopKind.PAUSE)

    def cancel(self, job_id: str) -> None:
        """Stops a job and deletes its partial files."""
        self._request(job_id, StopKind.CANCEL)

    def resume(self, job_id: str) -> None:
        """Puts a paused or failed job back in the queue."""
        with self._cond:
            job = self._jobs[job_id]
            if job.status.state not in (JobState.PAUSED, JobState.FAILED):
                return
            job.stop = None
            job.meter.reset()
            status = job.status = replace(
                job.status, state=JobState.QUEUED, error=None, kind=None, speed=0.0
            )
            self._cond.notify_all()
        self._emit(status)

    def remove(self, job_id: str) -> None:
        """Drops a finished or cancelled job from the list (its files are not touched)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status.state not in (JobState.DONE, JobState.CANCELLED):
                return
            del self._jobs[job_id]
        self._save_journal()

    def set_priority(self, job_id: str, priority: int) -> None:
        """Higher priority jobs start first (running ones are not preempted)."""
        with self._cond:
            job = self._jobs[job_id]
            status = job.status = replace(job.status, priority=priority)
        self._emit(status)
        self._save_journal()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, workers: int) -> None:
        """How many downloads may run at once; running ones beyond a lower limit finish first."""
        with self._cond:
            self._limit = max(1, workers)
            self._cond.notify_all()
        self._spawn()

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
        """Pauses running jobs (keeping partials) and stops the workers.

        The journal keeps running and queued jobs as queued, so the next start
        resumes them; the pauses that closing causes are not recorded.
        """
        with self._cond:
            self._closing = True
            for job in self._jobs.values():
                if job.status.state is JobState.RUNNING:
                    job.stop = StopKind.PAUSE
            records = [
                replace(r, state="queued") if r.state == "running" else r for r in self._records()
            ]
            self._cond.notify_all()
        self._write_journal(records, final=True)
        for t in self._threads:
            t.join(timeout)

    # --- the journal --------------------------------------------------------------------
    def _restore(self, journal: QueueFile) -> None:
        saved = journal.load()
        if not saved:
            return
        try:
            on_disk = {(p.repo_id, p.path): p for p in self._downloader().pending()}
        except OSError as exc:
            log.warning("could not list partial downloads: %s", exc)
            on_disk = {}
        for rec in saved:
            parts = [on_disk.get((rec.repo_id, f)) for f in rec.files]
            done, total = rec.done, rec.total
            if all(p is not None for p in parts):
                # The bytes on disk, not the figure saved at the last state change.
                done = sum(p.done for p in parts if p is not None)
                total = sum(p.size for p in parts if p is not None)
            state = {"paused": JobState.PAUSED, "failed": JobState.FAILED}.get(
                rec.state, JobState.QUEUED
            )
            kind = None
            if state is JobState.FAILED:
                kind = FailureKind(rec.kind) if rec.kind in set(FailureKind) else FailureKind.OTHER
            self._add(
                rec.repo_id,
                rec.files,
                rec.revision,
                rec.priority,
                state,
                done=min(done, total) if total else done,
                total=total,
                error=rec.error if state is JobState.FAILED else None,
                kind=kind,
            )

    def _records(self) -> list[QueuedDownload]:
        """Every unfinished job as the journal keeps it (called holding the lock)."""
        out = []
        for job in sorted(self._jobs.values(), key=lambda j: j.seq):
            st = job.status
            saved = _SAVED_STATES.get(st.state)
            if saved is None:
                continue
            out.append(
                QueuedDownload(
                    st.repo_id,
                    st.files,
                    job.revision,
                    saved,
                    st.priority,
                    st.done,
                    st.total,
                    st.error,
                    st.kind.value if st.kind is not None else None,
                )
            )
        return out

    def _save_journal(self) -> None:
        if self._journal is None:
            return
        with self._cond:
            records = self._records()
            self._saved = {j.status.job_id: j.status.state for j in self._jobs.values()}
        self._write_journal(records)

    def _write_journal(self, records: list[QueuedDownload], *, final: bool = False) -> None:
        if self._journal is None:
            return
        with self._journal_lock:
            if self._journal_closed:
                return
            if final:
                self._journal_closed = True
            try:
                self._journal.save(records)
            except OSError as exc:
                # A full disk must not stop the downloads; the queue is saved at the next change.
                log.warning("could not save the download queue: %s", exc)

    _journal_closed = False

    # --- internals ----------------------------------------------------------------------
    def _request(self, job_id: str, kind: StopKind) -> None:
        discard = False
        with self._cond:
            job = self._jobs[job_id]
            state = job.status.state
            if state in FINAL_STATES and not (kind is StopKind.CANCEL and state is JobState.FAILED):
                return
            if state is JobState.RUNNING:
                job.stop = kind  # the worker stops at the next chunk
                return
            new_state = JobState.PAUSED if kind is StopKind.PAUSE else JobState.CANCELLED
            if kind is StopKind.PAUSE and state is JobState.FAILED:
                return
            discard = kind is StopKind.CANCEL
            status = job.status = replace(job.status, state=new_state, speed=0.0, eta=None)
            self._cond.notify_all()
        if discard:
            self._downloader().discard(status.repo_id, status.files)
        self._emit(status)

    def _running(self) -> int:
        return sum(j.status.state is JobState.RUNNING for j in self._jobs.values())

    def _next_job(self) -> _Job | None:
        with self._cond:
            while True:
                if self._closing:
                    return None
                queued = [j for j in self._jobs.values() if j.status.state is JobState.QUEUED]
                if queued and self._running() < self._limit:
                    job = max(queued, key=lambda j: (j.status.priority, -j.seq))
                    job.stop = None
                    job.status = replace(job.status, state=JobState.RUNNING)
                    status = job.status
                    self._cond.notify_all()  # for wait(..., {RUNNING})
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

        def should_stop() -> StopKind | None:
            return job.stop

        try:
            paths = self._downloader().download_model(
                st.repo_id, st.files, job.revision, on_progress=on_progress, should_stop=should_stop
            )
            self._finish(job, JobState.DONE, paths=tuple(paths))
        except DownloadInterrupted as exc:
            self._finish(job, JobState.PAUSED if exc.kind is StopKind.PAUSE else JobState.CANCELLED)
        except PeregrineError as exc:
            self._finish(job, JobState.FAILED, error=str(exc), kind=failure_kind(exc))
        except Exception as exc:
            # A bug, not a user error: keep the traceback in the log and show the job failed.
            log.exception("download %s of %s crashed", job.status.job_id, st.repo_id)
            self._finish(
                job, JobState.FAILED, error=f"{type(exc).__name__}: {exc}", kind=FailureKind.OTHER
            )

    def _finish(
        self,
        job: _Job,
        state: JobState,
        *,
        error: str | None = None,
        kind: FailureKind | None = None,
        paths: tuple[Path, ...] = (),
    ) -> None:
        with self._cond:
            status = job.status = replace(
                job.status, state=state, error=error, kind=kind, paths=paths, speed=0.0, eta=None
            )
            self._cond.notify_all()
        self._emit(status)

    def _emit(self, status: DownloadStatus) -> None:
        if self._journal is not None and self._saved.get(status.job_id) != status.state:
            self._save_journal()
        if self._listener is None:
            return
        try:
            self._listener(status)
        except Exception:
            # A broken listener must not kill the download; its traceback goes to the log.
            log.exception("download listener failed")
