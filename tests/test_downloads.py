"""Downloader and DownloadQueue against the loopback hub: resume, verify, disk full, queue control."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from app.services.models.downloads import (
    ChecksumError,
    DiskFullError,
    Downloader,
    DownloadInterrupted,
    DownloadQueue,
    DownloadStatus,
    JobState,
    StopKind,
)
from engine.errors import PeregrineError
from engine.paths import Paths
from tests.fake_hub import VALID_TOKEN, FakeHub, hub_with_blob

REPO = "acme/Blob-GGUF"
FILE = "blob-Q4_0.gguf"
SIZE = 3 * 1024 * 1024 + 12345


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with hub_with_blob(tmp_path, REPO, FILE, SIZE) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.fixture
def paths() -> Paths:
    return Paths.from_env().ensure()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FullDiskWriter:
    """Opens partial files like the real writer, but the disk "fills up" after `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written = 0

    def __call__(self, path: Path) -> BinaryIO:
        outer = self
        fh = path.open("ab")

        class Writer:
            def write(self, data: bytes) -> int:
                room = outer.limit - outer.written
                if len(data) > room:
                    fh.write(data[: max(room, 0)])
                    outer.written = outer.limit
                    raise OSError(errno.ENOSPC, "No space left on device")
                outer.written += len(data)
                return fh.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(fh, name)

        return Writer()  # type: ignore[return-value]


def served_ranges(hub: FakeHub, repo: str, file: str) -> list[str | None]:
    return [r.range for r in hub.file_requests(repo, file)]


def test_download_verifies_and_places_atomically(hub: FakeHub, paths: Paths) -> None:
    seen: list[tuple[int, int]] = []
    [final] = Downloader(paths).download_model(
        REPO, [FILE], on_progress=lambda d, t: seen.append((d, t))
    )
    data = hub.repos[REPO].files[FILE].source
    assert isinstance(data, bytes)
    assert final == paths.models / "acme--Blob-GGUF" / FILE
    assert sha(final.read_bytes()) == sha(data)
    assert list(paths.downloads.iterdir()) == []  # partial and sidecar are gone
    assert seen[-1] == (SIZE, SIZE)
    assert hub.served[f"{REPO}/{FILE}"] == SIZE
    # The hub was asked through its resolve URL and the bytes came from the other origin.
    assert all(r.host.startswith("localhost") for r in hub.file_requests(REPO, FILE))


def test_flipped_byte_fails_and_deletes_the_bytes(hub: FakeHub, paths: Paths) -> None:
    hub.corrupt.add(f"{REPO}/{FILE}")
    expected = hub.repos[REPO].files[FILE].sha256
    with pytest.raises(ChecksumError) as info:
        Downloader(paths).download_model(REPO, [FILE])
    message = str(info.value)
    assert "SHA-256 mismatch" in message and expected in message and "deleted" in message
    assert not (paths.models / "acme--Blob-GGUF" / FILE).exists()
    assert list(paths.downloads.iterdir()) == []


def test_full_disk_keeps_partial_then_resumes(hub: FakeHub, paths: Paths) -> None:
    limit = SIZE // 3
    with pytest.raises(DiskFullError, match=r"disk filled up.*partial file is kept"):
        Downloader(paths, open_writer=FullDiskWriter(limit)).download_model(REPO, [FILE])
    [partial] = paths.downloads.glob("*.part")
    assert partial.stat().st_size == limit
    assert not (paths.models / "acme--Blob-GGUF" / FILE).exists()

    [final] = Downloader(paths).download_model(REPO, [FILE])
    last = hub.file_requests(REPO, FILE)[-1]
    assert last.range == f"bytes={limit}-"
    assert last.served == SIZE - limit
    assert sha(final.read_bytes()) == hub.repos[REPO].files[FILE].sha256


def test_network_cut_resumes_in_call_and_hash_covers_every_byte(hub: FakeHub, paths: Paths) -> None:
    cut = SIZE // 2 + 7
    hub.drop_after[f"{REPO}/{FILE}"] = cut
    [final] = Downloader(paths).download_model(REPO, [FILE])
    first, retry = served_ranges(hub, REPO, FILE)
    assert first is None and retry is not None
    # Every byte that arrived before the cut was kept: the retry asks for the rest only.
    assert retry == f"bytes={cut}-"
    assert sha(final.read_bytes()) == hub.repos[REPO].files[FILE].sha256
    assert hub.served[f"{REPO}/{FILE}"] == SIZE


def test_pending_lists_partials_left_on_disk(hub: FakeHub, paths: Paths) -> None:
    downloader = Downloader(paths)
    assert downloader.pending() == []
    with pytest.raises(DiskFullError):
        Downloader(paths, open_writer=FullDiskWriter(1000)).download_model(REPO, [FILE])
    [pending] = downloader.pending()
    assert (pending.repo_id, pending.path, pending.done, pending.size) == (REPO, FILE, 1000, SIZE)
    assert pending.commit == hub.repos[REPO].commit


def test_not_enough_free_disk_fails_before_any_transfer(hub: FakeHub, paths: Paths) -> None:
    downloader = Downloader(paths, disk_free=lambda p: SIZE, disk_margin=100 * 1024 * 1024)
    with pytest.raises(DiskFullError, match="not enough free disk space"):
        downloader.download_model(REPO, [FILE])
    assert hub.file_requests(REPO, FILE) == []


def test_remote_change_starts_over_and_says_so(hub: FakeHub, paths: Paths) -> None:
    with pytest.raises(DiskFullError):
        Downloader(paths, open_writer=FullDiskWriter(SIZE // 2)).download_model(REPO, [FILE])
    # A new commit replaces the file on the hub.
    repo = hub.repos[REPO]
    repo.commit = "f" * 40
    new = os.urandom(SIZE)
    repo.add(FILE, new)
    notices: list[str] = []
    [final] = Downloader(paths).download_model(REPO, [FILE], on_notice=notices.append)
    assert any("changed on the hub" in n and "starting over" in n for n in notices)
    assert served_ranges(hub, REPO, FILE)[-1] is None  # from byte 0
    assert final.read_bytes() == new


def test_split_model_downloads_every_part(hub: FakeHub, paths: Paths) -> None:
    parts = [f"Tiny-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    finals = Downloader(paths).download_model("acme/Tiny-GGUF", parts)
    assert [p.name for p in finals] == parts
    for p in finals:
        assert sha(p.read_bytes()) == hub.repos["acme/Tiny-GGUF"].files[p.name].sha256


def test_gated_repo_needs_a_token(hub: FakeHub, paths: Paths) -> None:
    hub.add_repo("acme/Gated-GGUF", gated=True).add("g-Q4_0.gguf", b"GGUF" * 1000)
    with pytest.raises(PeregrineError, match=r"acme/Gated-GGUF is gated.*HF_TOKEN"):
        Downloader(paths, token=False).download_model("acme/Gated-GGUF", ["g-Q4_0.gguf"])
    with pytest.raises(PeregrineError, match="token has no access"):
        Downloader(paths, token="hf_wrong").download_model("acme/Gated-GGUF", ["g-Q4_0.gguf"])
    [final] = Downloader(paths, token=VALID_TOKEN).download_model(
        "acme/Gated-GGUF", ["g-Q4_0.gguf"]
    )
    assert final.read_bytes() == b"GGUF" * 1000


def test_missing_file_is_a_clear_error(hub: FakeHub, paths: Paths) -> None:
    with pytest.raises(PeregrineError, match=r"has no file nope\.gguf"):
        Downloader(paths).download_model(REPO, ["nope.gguf"])


# --- the queue -----------------------------------------------------------------------------


class Recorder:
    """Collects statuses and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.statuses: list[DownloadStatus] = []
        self._cond = threading.Condition()

    def __call__(self, status: DownloadStatus) -> None:
        with self._cond:
            self.statuses.append(status)
            self._cond.notify_all()

    def wait_for(self, pred: Any, timeout: float = 30) -> DownloadStatus:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(pred(s) for s in self.statuses), timeout)
            assert ok, "condition not reached"
            return next(s for s in self.statuses if pred(s))


def test_pause_keeps_partial_and_resume_continues(hub: FakeHub, paths: Paths) -> None:
    hub.bytes_per_second = 4 * 1024 * 1024
    rec = Recorder()
    queue = DownloadQueue(Downloader(paths), listener=rec)
    try:
        job = queue.add(REPO, [FILE])
        rec.wait_for(lambda s: s.state is JobState.RUNNING and s.done >= SIZE // 3)
        queue.pause(job)
        assert queue.wait(job, frozenset({JobState.PAUSED}), timeout=30).state is JobState.PAUSED
        [partial] = paths.downloads.glob("*.part")
        kept = partial.stat().st_size
        assert 0 < kept < SIZE
        hub.bytes_per_second = None
        queue.resume(job)
        done = queue.wait(job, timeout=30)
        assert done.state is JobState.DONE, done.error
        assert done.paths and sha(done.paths[0].read_bytes()) == hub.repos[REPO].files[FILE].sha256
        last = hub.file_requests(REPO, FILE)[-1]
        assert last.range == f"bytes={kept}-"
        # The resume fetched exactly the bytes that were missing on disk.
        assert last.served == SIZE - kept
    finally:
        queue.close()


def test_cancel_deletes_partial(hub: FakeHub, paths: Paths) -> None:
    hub.bytes_per_second = 4 * 1024 * 1024
    rec = Recorder()
    queue = DownloadQueue(Downloader(paths), listener=rec)
    try:
        job = queue.add(REPO, [FILE])
        rec.wait_for(lambda s: s.state is JobState.RUNNING and s.done > 0)
        queue.cancel(job)
        assert queue.wait(job, timeout=30).state is JobState.CANCELLED
        assert list(paths.downloads.iterdir()) == []
        assert not (paths.models / "acme--Blob-GGUF").exists()
    finally:
        queue.close()


def test_priority_picks_the_next_job(hub: FakeHub, paths: Paths) -> None:
    hub.bytes_per_second = 2 * 1024 * 1024
    rec = Recorder()
    queue = DownloadQueue(Downloader(paths), workers=1, listener=rec)
    try:
        blocker = queue.add(REPO, [FILE])
        rec.wait_for(lambda s: s.job_id == blocker and s.state is JobState.RUNNING)
        low = queue.add("acme/Tiny-GGUF", ["Tiny-Q8_0.gguf"], priority=0)
        high = queue.add("acme/Tiny-GGUF", ["Tiny-IQ4_XS.gguf"], priority=0)
        queue.set_priority(high, 5)
        queue.pause(blocker)
        for job in (low, high):
            assert queue.wait(job, timeout=30).state is JobState.DONE
        started = [s.job_id for s in rec.statuses if s.state is JobState.RUNNING and s.done == 0]
        order = [j for j in dict.fromkeys(started) if j in (low, high)]
        assert order == [high, low]
        assert queue.status(blocker).state is JobState.PAUSED
    finally:
        queue.close()


def test_progress_is_throttled_and_carries_speed(hub: FakeHub, paths: Paths) -> None:
    ticks = itertools.count()
    clock_lock = threading.Lock()

    def clock() -> float:
        # Every reading advances 1 ms: a fake clock, so no assertion depends on real time.
        with clock_lock:
            return next(ticks) / 1000

    rec = Recorder()
    queue = DownloadQueue(Downloader(paths), listener=rec, clock=clock, interval=0.1)
    try:
        job = queue.add(REPO, [FILE])
        assert queue.wait(job, timeout=30).state is JobState.DONE
    finally:
        queue.close()
    running = [s for s in rec.statuses if s.state is JobState.RUNNING]
    chunks = SIZE // (64 * 1024)
    # Without throttling there would be one status per chunk.
    assert 1 < len(running) < chunks // 5
    assert any(s.speed > 0 and s.eta is not None for s in running)
    assert rec.statuses[-1].done == SIZE == rec.statuses[-1].total


def test_interrupt_kinds(hub: FakeHub, paths: Paths) -> None:
    downloader = Downloader(paths)
    with pytest.raises(DownloadInterrupted) as info:
        downloader.download_model(REPO, [FILE], should_stop=lambda: StopKind.PAUSE)
    assert info.value.kind == "pause"
    assert len(list(paths.downloads.glob("*.part"))) == 1
    with pytest.raises(DownloadInterrupted):
        downloader.download_model(REPO, [FILE], should_stop=lambda: StopKind.CANCEL)
    assert list(paths.downloads.iterdir()) == []
