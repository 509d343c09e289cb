"""The download queue as the app uses it, without Qt: its file on disk, its limit, failure kinds.

Against the loopback hub (tests/fake_hub.py); the hub's marks used by Discover
(last update, QAT, MTP) are checked here too.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.services.models.downloads import (
    Downloader,
    DownloadQueue,
    FailureKind,
    JobState,
    failure_kind,
)
from app.services.models.hub import HubService, QuantOption, RemoteFile, RetryPolicy
from app.services.models.queue_file import QueuedDownload, QueueFile
from engine.paths import Paths
from tests.fake_hub import FakeHub, Fault, hub_with_blob

REPO = "acme/Blob-GGUF"
FILE = "blob-Q4_0.gguf"
SIZE = 2 * 1024 * 1024 + 777
FAST = RetryPolicy(retries=2, base_delay=0.0, timeout=0.5)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with hub_with_blob(tmp_path, REPO, FILE, SIZE) as h:
        h.add_repo("acme/Gated-GGUF", gated=True).add("g-Q4_0.gguf", b"GGUF" + os.urandom(5000))
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.fixture
def paths() -> Paths:
    return Paths.from_env().ensure()


def journal(paths: Paths) -> QueueFile:
    return QueueFile(paths.downloads / "queue.json")


def test_the_queue_file_keeps_unfinished_downloads_and_the_next_queue_resumes_them(
    hub: FakeHub, paths: Paths
) -> None:
    hub.bytes_per_second = 1e6
    queue = DownloadQueue(Downloader(paths), journal=journal(paths))
    running = queue.add(REPO, [FILE])
    paused = queue.add("acme/Tiny-GGUF", ["Tiny-Q8_0.gguf"])
    queue.pause(paused)
    gated = queue.add("acme/Gated-GGUF", ["g-Q4_0.gguf"])
    assert queue.wait(gated).state is JobState.FAILED
    queue.wait(running, frozenset({JobState.RUNNING}))
    while queue.status(running).done < SIZE // 4:
        queue.wait(running, frozenset({JobState.DONE}), timeout=0.05)
    queue.close()
    saved = journal(paths).load()
    assert [(d.repo_id, d.state) for d in saved] == [
        (REPO, "queued"),  # running at quit: resumed next time
        ("acme/Tiny-GGUF", "paused"),
        ("acme/Gated-GGUF", "failed"),
    ]
    assert saved[2].kind == "access" and "gated" in (saved[2].error or "")
    partial = next(paths.downloads.glob("*.part"))
    kept = partial.stat().st_size
    assert 0 < kept < SIZE
    # The next queue: paused and failed ones wait, the interrupted one goes on from disk.
    hub.bytes_per_second = None
    seen: list[Any] = []
    again = DownloadQueue(Downloader(paths), journal=journal(paths), listener=seen.append)
    by_repo = {s.repo_id: s for s in again.statuses()}
    assert by_repo["acme/Tiny-GGUF"].state is JobState.PAUSED
    assert by_repo["acme/Gated-GGUF"].state is JobState.FAILED
    assert by_repo["acme/Gated-GGUF"].kind is FailureKind.ACCESS
    # Shown from the bytes on disk before any request.
    first = next(s for s in seen if s.repo_id == REPO)
    assert first.state is JobState.QUEUED and first.done == kept and first.total == SIZE
    done = again.wait(by_repo[REPO].job_id)
    assert done.state is JobState.DONE
    assert hub.file_requests(REPO, FILE)[-1].range == f"bytes={kept}-"
    again.close()
    assert [d.repo_id for d in journal(paths).load()] == ["acme/Tiny-GGUF", "acme/Gated-GGUF"]


def test_a_broken_queue_file_is_moved_aside_and_bad_entries_are_skipped(
    paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    file = journal(paths)
    file.path.parent.mkdir(parents=True, exist_ok=True)
    file.path.write_text("{not json")
    assert file.load() == []
    assert not file.path.exists() and list(file.path.parent.glob("queue.json.broken-*"))
    entries = [
        {"repo_id": "acme/Ok-GGUF", "files": ["ok.gguf"], "state": "paused"},
        {"repo_id": "acme/Evil-GGUF", "files": ["../../etc/passwd"], "state": "queued"},
        {"repo_id": "not a repo", "files": ["x.gguf"], "state": "queued"},
        {"repo_id": "acme/Odd-GGUF", "files": ["x.gguf"], "state": "exploded"},
        {"repo_id": "acme/Big-GGUF", "files": ["x.gguf"], "state": "queued", "done": -5},
        "junk",
    ]
    file.path.write_text(json.dumps({"version": 1, "downloads": entries}))
    assert file.load() == [QueuedDownload("acme/Ok-GGUF", ("ok.gguf",), None, "paused")]
    assert "skipping a download" in caplog.text
    os.unlink(file.path)
    os.mkfifo(file.path)  # never read (it would block): moved aside like any bad file
    assert file.load() == []


def test_at_most_the_limit_runs_and_raising_it_starts_the_next(hub: FakeHub, paths: Paths) -> None:
    hub.bytes_per_second = 1e6
    queue = DownloadQueue(Downloader(paths), workers=1)
    try:
        a = queue.add(REPO, [FILE])
        b = queue.add("acme/Tiny-GGUF", ["Tiny-Q8_0.gguf"])
        queue.wait(a, frozenset({JobState.RUNNING}))
        assert queue.wait(b, frozenset({JobState.RUNNING}), timeout=0.5).state is JobState.QUEUED
        assert queue.add(REPO, [FILE]) == a  # the same file is never queued twice
        queue.set_limit(2)
        assert queue.wait(b, timeout=30).state is JobState.DONE
        assert queue.status(a).state is JobState.RUNNING
    finally:
        queue.close()


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ("gated", FailureKind.ACCESS),
        ("missing", FailureKind.NOT_FOUND),
        ("server", FailureKind.SERVER),
        ("stall", FailureKind.NETWORK),
        ("refused", FailureKind.NETWORK),
        ("corrupt", FailureKind.CHECKSUM),
    ],
)
def test_failures_are_sorted_by_what_the_user_can_do(
    hub: FakeHub, paths: Paths, fault: str, kind: FailureKind
) -> None:
    repo, file = REPO, FILE
    endpoint = hub.endpoint
    if fault == "gated":
        repo, file = "acme/Gated-GGUF", "g-Q4_0.gguf"
    elif fault == "missing":
        file = "nope-Q4_0.gguf"
    elif fault == "server":
        hub.inject("cdn", f"{repo}/{file}", Fault(status=502, times=None))
    elif fault == "stall":
        hub.inject("resolve", f"{repo}/{file}", Fault(stall=True, times=None))
    elif fault == "corrupt":
        hub.corrupt.add(f"{repo}/{file}")
    else:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    queue = DownloadQueue(Downloader(paths, endpoint, retry=FAST, sleep=lambda _s: None))
    try:
        st = queue.wait(queue.add(repo, [file]), timeout=60)
    finally:
        queue.close()
    assert st.state is JobState.FAILED and st.kind is kind, st.error
    assert st.error


def test_failure_kind_of_other_errors() -> None:
    assert failure_kind(ValueError("x")) is FailureKind.OTHER


def test_search_results_carry_the_last_update(hub: FakeHub) -> None:
    hub.repos["acme/Tiny-GGUF"].last_modified = "2024-11-02T08:30:00.000Z"
    [result] = HubService().search("tiny")
    assert result.last_modified == datetime(2024, 11, 2, 8, 30, tzinfo=UTC)
    hub.repos["acme/Tiny-GGUF"].last_modified = "yesterday-ish"
    assert HubService().search("tiny")[0].last_modified is None


class _Header:
    def __init__(self, metadata: dict[str, Any], nextn: int = 0) -> None:
        self.metadata = metadata
        self.nextn_layers = nextn


def _opt(name: str, header: Any = None) -> QuantOption:
    return QuantOption(name, None, [RemoteFile(name, 1, None)], header=header)


def test_qat_and_mtp_marks_from_the_name_or_the_header() -> None:
    assert _opt("gemma-3-4b-it-qat-Q4_0.gguf").qat
    assert not _opt("Qatar-7B-Q4_0.gguf").qat and not _opt("Q4_0.gguf").qat
    assert _opt("m-Q4_0.gguf", _Header({"general.finetune": "it-QAT"})).qat
    assert _opt("m-Q4_0.gguf", _Header({"general.tags": ["text", "qat"]})).qat
    plain = _opt("m-Q4_0.gguf", _Header({}))
    assert not plain.qat and not plain.mtp and plain.mtp_layers == 0
    heads = _opt("glm-Q4_0.gguf", _Header({}, nextn=1))
    assert heads.mtp and heads.mtp_layers == 1
    named = _opt("model-MTP-Q4_0.gguf")
    assert named.mtp and named.mtp_layers is None  # header not read yet
