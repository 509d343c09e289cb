"""Downloads against a faulty hub and CDN: every fault ends in a verified file or one clear error.

Each test injects one misbehaviour into the loopback hub (tests/fake_hub.py
`Fault`) and checks what lands: the final file's hash, the partial bytes kept,
the requests made, and the error text. Backoff waits go through a recording
sleep, so no test waits for real; stalls use a short read timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import cli
from app.services.models.downloads import (
    DiskFullError,
    Downloader,
    DownloadError,
    DownloadInterrupted,
    DownloadQueue,
    JobState,
    StopKind,
)
from app.services.models.hub import HubService, RetriesExhausted, RetryPolicy, parse_retry_after
from engine.errors import PeregrineError
from engine.paths import Paths
from tests.fake_hub import VALID_TOKEN, FakeHub, Fault, hub_with_blob
from tests.test_downloads import FullDiskWriter

REPO = "acme/Blob-GGUF"
FILE = "blob-Q4_0.gguf"
KEY = f"{REPO}/{FILE}"
SIZE = 2 * 1024 * 1024 + 4321
KEPT = "partial file is kept"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with hub_with_blob(tmp_path, REPO, FILE, SIZE) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


@pytest.fixture
def paths() -> Paths:
    return Paths.from_env().ensure()


class Sleeps:
    """A sleep that records the seconds asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    @property
    def total(self) -> float:
        return sum(self.calls)


POLICY = RetryPolicy(retries=2, base_delay=1.0, max_delay=8.0, max_retry_after=60.0, timeout=5.0)


def downloader(paths: Paths, sleeps: Sleeps, **kwargs: object) -> Downloader:
    policy = kwargs.pop("retry", POLICY)
    return Downloader(paths, retry=policy, sleep=sleeps, **kwargs)  # type: ignore[arg-type]


def expected(hub: FakeHub) -> str:
    return hub.repos[REPO].files[FILE].sha256


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ranges(hub: FakeHub) -> list[str | None]:
    return [r.range for r in hub.file_requests(REPO, FILE)]


def partials(paths: Paths) -> list[Path]:
    return sorted(paths.downloads.glob("*.part"))


def leave_partial(hub: FakeHub, paths: Paths, n: int) -> Path:
    """A first pull that stops after n bytes on disk (the disk fills up), keeping its partial."""
    with pytest.raises(DiskFullError):
        Downloader(paths, open_writer=FullDiskWriter(n)).download_model(REPO, [FILE])
    [partial] = partials(paths)
    assert partial.stat().st_size == n
    return partial


def all_files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --- the connection drops mid-body ------------------------------------------------------------


def test_cut_mid_body_resumes_from_the_bytes_on_disk(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=700_000), Fault(cut_after=500_000))
    sleeps, notices = Sleeps(), list[str]()
    [final] = downloader(paths, sleeps).download_model(REPO, [FILE], on_notice=notices.append)
    assert sha_of(final) == expected(hub)
    # Each retry asks for exactly the bytes not yet on disk: nothing is fetched twice.
    assert ranges(hub) == [None, "bytes=700000-", "bytes=1200000-"]
    assert hub.served[KEY] == SIZE
    assert sleeps.total == 2.0  # one base delay per cut: each attempt made progress
    assert sum("retrying in 1.0 s" in n for n in notices) == 2


def test_body_ending_early_without_content_length_is_resumed(hub: FakeHub, paths: Paths) -> None:
    # No Content-Length: the client sees a clean end of the body, not an error.
    hub.inject("cdn", KEY, Fault(cut_after=300_000, no_length=True))
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert sha_of(final) == expected(hub)
    assert ranges(hub) == [None, "bytes=300000-"]


def test_cuts_without_progress_stop_after_bounded_retries_and_keep_the_partial(
    hub: FakeHub, paths: Paths
) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=123_456), Fault(cut_after=0, times=None))
    sleeps, notices = Sleeps(), list[str]()
    with pytest.raises(RetriesExhausted) as info:
        downloader(paths, sleeps).download_model(REPO, [FILE], on_notice=notices.append)
    message = str(info.value)
    assert "failed after 3 tries" in message and KEPT in message and "\n" not in message
    # Backoff doubles while no byte arrives: 1 s, then 2 s, then the budget is spent.
    waits = [n.split("retrying in ")[1].split(" s")[0] for n in notices if "retrying" in n]
    assert waits == ["1.0", "2.0"]
    assert len(ranges(hub)) == 3
    [partial] = partials(paths)
    assert partial.stat().st_size == 123_456
    assert not (paths.models / "acme--Blob-GGUF").exists()

    # The next pull, against a healthy server, continues from those bytes.
    hub.faults.clear()
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert ranges(hub)[-1] == "bytes=123456-"
    assert sha_of(final) == expected(hub)


# --- Range ignored, 416, partials of the wrong size ---------------------------------------------


def test_server_ignoring_range_does_not_append_the_whole_file(hub: FakeHub, paths: Paths) -> None:
    kept = leave_partial(hub, paths, 1_000_000)
    hub.inject("cdn", KEY, Fault(ignore_range=True))
    notices: list[str] = []
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert final.stat().st_size == SIZE
    assert sha_of(final) == expected(hub)
    assert ranges(hub)[-1] == "bytes=1000000-"
    assert hub.file_requests(REPO, FILE)[-1].served == SIZE  # the server sent it all again
    assert any("ignored the resume request" in n for n in notices)
    assert not kept.exists()


def test_range_ignored_after_a_cut_in_the_same_call(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=400_000), Fault(ignore_range=True, cut_after=900_000))
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert sha_of(final) == expected(hub)
    # The 200 answer's first 400,000 bytes were dropped; its next 500,000 were kept.
    assert ranges(hub) == [None, "bytes=400000-", "bytes=900000-"]


@pytest.mark.parametrize(
    "fault",
    [
        # A 206 that claims to start further on than asked would leave a hole in the file.
        Fault(headers={"Content-Range": f"bytes 600000-{SIZE - 1}/{SIZE}"}),
        Fault(headers={"Content-Range": "bytes whatever"}),
        # 416 to a resume the file's size allows.
        Fault(status=416, headers={"Content-Range": f"bytes */{SIZE}"}),
    ],
    ids=["hole", "unreadable", "416"],
)
def test_wrong_answer_to_a_resume_falls_back_to_the_whole_file(
    hub: FakeHub, paths: Paths, fault: Fault
) -> None:
    leave_partial(hub, paths, 500_000)
    hub.inject("cdn", KEY, fault)
    notices: list[str] = []
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert sha_of(final) == expected(hub)
    # The bad answer, then the whole file asked for, its first 500,000 bytes dropped.
    assert ranges(hub)[-2:] == ["bytes=500000-", None]
    assert any("asking for the whole file" in n for n in notices)


def test_resume_answer_for_another_size_is_refused_and_the_partial_kept(
    hub: FakeHub, paths: Paths
) -> None:
    leave_partial(hub, paths, 500_000)
    hub.inject("cdn", KEY, Fault(headers={"Content-Range": f"bytes 500000-{SIZE - 1}/{SIZE + 9}"}))
    with pytest.raises(DownloadError, match=r"but the hub says it has"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    [partial] = partials(paths)
    assert partial.stat().st_size == 500_000


def test_complete_partial_is_verified_without_a_request(hub: FakeHub, paths: Paths) -> None:
    partial = leave_partial(hub, paths, 1000)
    data = hub.repos[REPO].files[FILE].source
    assert isinstance(data, bytes)
    partial.write_bytes(data)  # e.g. killed right after the last byte was written
    before = len(ranges(hub))
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert sha_of(final) == expected(hub)
    assert len(ranges(hub)) == before  # no "bytes=SIZE-" request that would earn a 416


def test_partial_larger_than_the_file_is_cut_back_and_verified(hub: FakeHub, paths: Paths) -> None:
    partial = leave_partial(hub, paths, 1000)
    data = hub.repos[REPO].files[FILE].source
    assert isinstance(data, bytes)
    partial.write_bytes(data + b"trailing junk")
    notices: list[str] = []
    before = len(ranges(hub))
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert final.read_bytes() == data
    assert len(ranges(hub)) == before
    assert any("larger than the file" in n for n in notices)


def test_kept_bytes_that_do_not_verify_are_fetched_again(hub: FakeHub, paths: Paths) -> None:
    partial = leave_partial(hub, paths, 1000)
    partial.write_bytes(os.urandom(SIZE + 10))  # the right size and more, the wrong bytes
    notices: list[str] = []
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert sha_of(final) == expected(hub)
    assert ranges(hub)[-1] is None  # the second fetch started at byte 0
    assert any("fetching it again from the start" in n for n in notices)


def test_416_when_the_cdn_has_fewer_bytes_than_the_hub_says(hub: FakeHub, paths: Paths) -> None:
    # The hub claims 5,000 bytes more than the CDN holds; the partial is already past the CDN's end.
    claimed = SIZE + 5000
    partial = leave_partial(hub, paths, 1000)
    partial.write_bytes(b"\0" * (SIZE + 100))
    # The partial's record says what the hub claimed when it was started.
    sidecar = partial.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "size": claimed}))
    hub.inject("resolve", KEY, Fault(headers={"X-Linked-Size": str(claimed)}, times=None))
    with pytest.raises(DownloadError) as info:
        downloader(paths, Sleeps(), disk_margin=0).download_model(REPO, [FILE])
    message = str(info.value)
    assert "HTTP 416" in message and f"it has {SIZE} bytes" in message and KEPT in message
    assert ranges(hub)[-1] == f"bytes={SIZE + 100}-"
    assert not (paths.models / "acme--Blob-GGUF").exists()


# --- 5xx and 429 --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_metadata_5xx_is_retried(hub: FakeHub, paths: Paths, status: int) -> None:
    hub.inject("resolve", KEY, Fault(status=status, times=2))
    sleeps, notices = Sleeps(), list[str]()
    [final] = downloader(paths, sleeps).download_model(REPO, [FILE], on_notice=notices.append)
    assert sha_of(final) == expected(hub)
    assert sleeps.calls == [1.0, 2.0]
    assert all(f"HTTP {status}" in n for n in notices if "retrying" in n)


def test_metadata_5xx_forever_gives_one_clear_line(hub: FakeHub, paths: Paths) -> None:
    hub.inject("resolve", KEY, Fault(status=503, times=None))
    sleeps = Sleeps()
    with pytest.raises(RetriesExhausted, match=r"failed after 3 tries: HTTP 503"):
        downloader(paths, sleeps).download_model(REPO, [FILE])
    assert sleeps.calls == [1.0, 2.0]
    assert hub.file_requests(REPO, FILE) == []
    assert list(paths.downloads.iterdir()) == []


def test_429_waits_as_long_as_retry_after_says(hub: FakeHub, paths: Paths) -> None:
    hub.inject("resolve", KEY, Fault(status=429, retry_after="7"))
    hub.inject("cdn", KEY, Fault(status=429, retry_after="3"))
    sleeps = Sleeps()
    [final] = downloader(paths, sleeps).download_model(REPO, [FILE])
    assert sha_of(final) == expected(hub)
    assert sleeps.calls[0] == 7.0  # the metadata call waits in one go
    assert sleeps.total == 10.0  # the transfer's 3 s come in short steps (a pause stays prompt)


def test_429_asking_for_an_hour_fails_at_once(hub: FakeHub, paths: Paths) -> None:
    hub.inject("resolve", KEY, Fault(status=429, retry_after="3600", times=None))
    sleeps = Sleeps()
    with pytest.raises(RetriesExhausted, match=r"asks to retry in 3600 s; try again later"):
        downloader(paths, sleeps).download_model(REPO, [FILE])
    assert sleeps.calls == []


def test_cdn_5xx_is_retried_and_then_fails_keeping_the_partial(hub: FakeHub, paths: Paths) -> None:
    hub.inject(
        "cdn", KEY, Fault(cut_after=250_000), Fault(status=502), Fault(status=500, times=None)
    )
    with pytest.raises(RetriesExhausted) as info:
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert "HTTP 500 from the download server" in str(info.value) and KEPT in str(info.value)
    [partial] = partials(paths)
    assert partial.stat().st_size == 250_000
    hub.faults.clear()
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert sha_of(final) == expected(hub)
    assert ranges(hub)[-1] == "bytes=250000-"


def test_retry_after_parsing() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=lambda: now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=lambda: now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- the file changes upstream ------------------------------------------------------------------


def test_file_changed_upstream_between_runs_is_not_mixed(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=800_000), Fault(cut_after=0, times=None))
    with pytest.raises(RetriesExhausted):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    old_partial = partials(paths)[0]
    hub.faults.clear()
    repo = hub.repos[REPO]
    repo.commit = "e" * 40
    new = os.urandom(SIZE - 999)
    repo.add(FILE, new)
    notices: list[str] = []
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert final.read_bytes() == new
    assert ranges(hub)[-1] is None  # not a resume: no old byte is reused
    assert not old_partial.exists()
    assert any("changed on the hub" in n for n in notices)


def test_partial_without_its_record_is_not_trusted(hub: FakeHub, paths: Paths) -> None:
    partial = leave_partial(hub, paths, 600_000)
    partial.with_suffix(".json").write_text("{torn")
    notices: list[str] = []
    [final] = downloader(paths, Sleeps()).download_model(REPO, [FILE], on_notice=notices.append)
    assert sha_of(final) == expected(hub)
    assert ranges(hub)[-1] is None
    assert any("no usable record" in n for n in notices)


# --- stalls -------------------------------------------------------------------------------------

# Long enough that a healthy loopback answer never times out on a busy machine.
STALL_POLICY = RetryPolicy(retries=3, base_delay=0.0, timeout=2.0, timeout_retries=1)


def test_stalled_cdn_times_out_with_a_clear_error(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=200_000), Fault(stall=True, times=None))
    with pytest.raises(RetriesExhausted) as info:
        downloader(paths, Sleeps(), retry=STALL_POLICY).download_model(REPO, [FILE])
    message = str(info.value)
    assert "no answer in time" in message and "2 times in a row" in message and KEPT in message
    [partial] = partials(paths)
    assert partial.stat().st_size == 200_000
    # The cut made progress, then two silent answers: a silent server is not retried for long.
    assert len(ranges(hub)) == 3


def test_stalled_metadata_call_times_out_with_a_clear_error(hub: FakeHub, paths: Paths) -> None:
    hub.inject("resolve", KEY, Fault(stall=True, times=None))
    with pytest.raises(RetriesExhausted, match="no answer in time"):
        downloader(paths, Sleeps(), retry=STALL_POLICY).download_model(REPO, [FILE])


def test_timeout_comes_from_hf_hub_download_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2.5")
    assert Downloader(Paths.from_env()).retry.timeout == 2.5
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "-1")
    assert Downloader(Paths.from_env()).retry.timeout == RetryPolicy().timeout


# --- redirects ----------------------------------------------------------------------------------


def test_metadata_redirect_loop_is_refused(hub: FakeHub, paths: Paths) -> None:
    resolve = f"{hub.endpoint}/{REPO}/resolve/main/{FILE}"
    hub.inject("resolve", KEY, Fault(location=resolve, times=None))
    with pytest.raises(DownloadError, match="redirect loop"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert hub.file_requests(REPO, FILE) == []


def test_cdn_redirect_loop_is_refused(hub: FakeHub, paths: Paths) -> None:
    commit = hub.repos[REPO].commit
    here = f"{hub.cdn}/cdn/{REPO}/{commit}/{FILE}"
    hub.inject("cdn", KEY, Fault(location=f"{here}?hop=1"), Fault(location=here))
    with pytest.raises(DownloadError, match="redirect loop"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert len(hub.file_requests(REPO, FILE)) == 2


@pytest.mark.parametrize("where", ["resolve", "cdn"])
@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://localhost/x.gguf"])
def test_redirect_to_a_non_http_scheme_is_refused(
    hub: FakeHub, paths: Paths, tmp_path: Path, where: str, target: str
) -> None:
    before = all_files_under(tmp_path)
    if where == "resolve":
        hub.inject("resolve", KEY, Fault(headers={"Location": target}))
    else:
        hub.inject("cdn", KEY, Fault(location=target))
    with pytest.raises(DownloadError, match=r"not an http\(s\) address"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert not (paths.models / "acme--Blob-GGUF").exists()
    assert {p for p in all_files_under(tmp_path) - before if p.suffix != ".json"} <= set(
        partials(paths)
    )


# --- hostile metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["-5", "0", str(1 << 60)])
def test_impossible_linked_size_is_refused(hub: FakeHub, paths: Paths, size: str) -> None:
    hub.inject("resolve", KEY, Fault(headers={"X-Linked-Size": size}))
    with pytest.raises(DownloadError, match=f"impossible size for {REPO}/{FILE}"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert hub.file_requests(REPO, FILE) == []


def test_hostile_commit_id_is_refused(hub: FakeHub, paths: Paths) -> None:
    hub.inject("resolve", KEY, Fault(headers={"X-Repo-Commit": "../../../../escape"}))
    with pytest.raises(DownloadError, match="unreadable commit id"):
        downloader(paths, Sleeps()).download_model(REPO, [FILE])
    assert list(paths.downloads.iterdir()) == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2, 3]", b'{"id": "x", "siblings": [{"size": 3}]}', b'"just a string"'],
)
def test_garbage_model_info_is_a_clear_error(hub: FakeHub, body: bytes) -> None:
    hub.inject("api", "acme/Tiny-GGUF", Fault(body=body, times=None))
    with pytest.raises(PeregrineError, match="Hugging Face sent an unreadable answer about"):
        HubService(retry=POLICY, sleep=Sleeps()).list_quants("acme/Tiny-GGUF")


@pytest.mark.parametrize("where", ["loop", "ftp://localhost/api"])
def test_model_info_redirects_nowhere_are_a_clear_error(hub: FakeHub, where: str) -> None:
    target = f"{hub.endpoint}/api/models/acme/Tiny-GGUF" if where == "loop" else where
    hub.inject("api", "acme/Tiny-GGUF", Fault(location=target, times=None))
    with pytest.raises(PeregrineError, match="could not get acme/Tiny-GGUF from Hugging Face"):
        HubService(retry=POLICY, sleep=Sleeps()).list_quants("acme/Tiny-GGUF")


def test_model_info_5xx_is_retried(hub: FakeHub) -> None:
    hub.inject("api", "acme/Tiny-GGUF", Fault(status=503, times=2))
    sleeps = Sleeps()
    listing = HubService(retry=POLICY, sleep=sleeps).list_quants("acme/Tiny-GGUF")
    assert listing.find("Q8_0") is not None
    assert sleeps.calls == [1.0, 2.0]


def test_search_retries_5xx_and_refuses_a_day_long_wait(hub: FakeHub) -> None:
    hub.inject("api", "search", Fault(status=502))
    sleeps = Sleeps()
    service = HubService(retry=POLICY, sleep=sleeps)
    assert [r.repo_id for r in service.search("Tiny")] == ["acme/Tiny-GGUF"]
    assert sleeps.calls == [1.0]
    hub.inject("api", "search", Fault(status=429, retry_after="86400"))
    with pytest.raises(PeregrineError, match="asks to retry in 86400 s"):
        service.search("Tiny")
    hub.inject("api", "search", Fault(body=b"<html>", times=None))
    with pytest.raises(PeregrineError, match="unreadable search answer"):
        service.search("Tiny")


def test_stalled_model_info_times_out(hub: FakeHub) -> None:
    hub.inject("api", "acme/Tiny-GGUF", Fault(stall=True, times=None))
    with pytest.raises(
        RetriesExhausted,
        match=r"about acme/Tiny-GGUF failed: no answer in time .* 2 times in a row",
    ):
        HubService(retry=STALL_POLICY, sleep=Sleeps()).list_quants("acme/Tiny-GGUF")


UNSAFE = ["../../evil-Q4_0.gguf", "/tmp/abs-Q5_0.gguf", "sub/../../up-Q6_K.gguf", "a\\b-Q3_K.gguf"]


def test_unsafe_names_in_a_listing_are_refused_by_name(hub: FakeHub) -> None:
    repo = hub.repos["acme/Tiny-GGUF"]
    for name in UNSAFE:
        repo.add(name, b"GGUF" * 10)
    listing = HubService(retry=POLICY, sleep=Sleeps()).list_quants("acme/Tiny-GGUF")
    assert {r.path for r in listing.refused} == set(UNSAFE)
    assert all(f.path not in UNSAFE for opt in listing.options for f in opt.files)  # never offered
    assert listing.find("Q8_0") is not None
    with pytest.raises(PeregrineError, match=r"refusing the file .* for Q4_0: '\.\.', '\.'"):
        listing.find("Q4_0")  # the only Q4_0 is the hostile one: say so, not "no such quant"
    with pytest.raises(PeregrineError, match=r"refusing the file '\.\./\.\./evil-Q4_0\.gguf'"):
        listing.find("../../evil-Q4_0.gguf")


@pytest.mark.parametrize("name", [*UNSAFE, "", "./x.gguf", "a//b.gguf", "C:/x.gguf"])
def test_downloader_refuses_unsafe_names_before_any_request(
    hub: FakeHub, paths: Paths, tmp_path: Path, name: str
) -> None:
    before = len(hub.requests)
    files_before = all_files_under(tmp_path)
    with pytest.raises(PeregrineError, match="refusing the file name"):
        downloader(paths, Sleeps()).download_model(REPO, [name])
    assert len(hub.requests) == before
    assert all_files_under(tmp_path) == files_before


@pytest.mark.parametrize("repo_id", ["../..", "acme/..", "a/b/c", "acme--x/y"])
def test_unsafe_repo_ids_are_refused(paths: Paths, repo_id: str) -> None:
    with pytest.raises(PeregrineError, match="is not a Hugging Face repo id"):
        Downloader(paths, endpoint="http://127.0.0.1:9").download_model(repo_id, [FILE])


def test_glob_characters_in_a_name_touch_no_other_partial(hub: FakeHub, paths: Paths) -> None:
    leave_partial(hub, paths, 5000)
    Downloader(paths).discard(REPO, ["*"])
    Downloader(paths).discard(REPO, ["[b]lob-Q4_0.gguf"])
    assert len(partials(paths)) == 1


def test_token_goes_to_the_hub_only(hub: FakeHub, paths: Paths) -> None:
    hub.add_repo("acme/Private-GGUF", gated=True).add("p-Q4_0.gguf", b"GGUF" * 5000)
    hub.inject("cdn", "acme/Private-GGUF/p-Q4_0.gguf", Fault(cut_after=100))
    [final] = downloader(paths, Sleeps(), token=VALID_TOKEN).download_model(
        "acme/Private-GGUF", ["p-Q4_0.gguf"]
    )
    assert final.read_bytes() == b"GGUF" * 5000
    hub_side = [r for r in hub.requests if r.host.startswith("127.0.0.1")]
    cdn_side = hub.file_requests("acme/Private-GGUF", "p-Q4_0.gguf")
    assert hub_side and all(r.authorization == f"Bearer {VALID_TOKEN}" for r in hub_side)
    assert len(cdn_side) == 2 and all(r.authorization is None for r in cdn_side)


# --- the queue: a pause during a backoff wait ----------------------------------------------------


def test_pause_during_backoff_keeps_the_partial(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(cut_after=300_000), Fault(status=503, times=None))
    holder: dict[str, object] = {}

    def sleep(seconds: float) -> None:
        # The first backoff wait is where the user presses pause.
        queue = holder["queue"]
        assert isinstance(queue, DownloadQueue)
        queue.pause(str(holder["job"]))

    queue = DownloadQueue(Downloader(paths, retry=POLICY, sleep=sleep), workers=1)
    holder["queue"] = queue
    try:
        holder["job"] = job = queue.add(REPO, [FILE])
        status = queue.wait(job, frozenset(JobState) - {JobState.QUEUED, JobState.RUNNING}, 30)
        assert status.state is JobState.PAUSED, status.error
        [partial] = partials(paths)
        assert partial.stat().st_size == 300_000
    finally:
        queue.close()


def test_interrupted_stays_an_interrupt_during_a_retry(hub: FakeHub, paths: Paths) -> None:
    hub.inject("cdn", KEY, Fault(status=503, times=None))
    with pytest.raises(DownloadInterrupted):
        downloader(paths, Sleeps()).download_model(
            REPO,
            [FILE],
            should_stop=lambda: StopKind.CANCEL if hub.file_requests(REPO, FILE) else None,
        )
    assert list(paths.downloads.iterdir()) == []


# --- what the user sees: `peregrine pull` and `peregrine ls` --------------------------------------


def pull(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["pull", *args])
    out, err = capsys.readouterr()
    return code, out, err


def own_ids(capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert cli.main(["ls", "--json", "--own"]) == 0
    return [e["id"] for e in json.loads(capsys.readouterr().out)]


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("peregrine pull: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_garbage_model_info(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    hub.inject("api", "acme/Tiny-GGUF", Fault(body=b"<html>oops</html>", times=None))
    code, out, err = pull(capsys, "acme/Tiny-GGUF", "--quant", "Q8_0")
    assert code == 1 and out == ""
    assert_one_error_line(err, "unreadable answer about acme/Tiny-GGUF")


def test_cli_path_traversal_writes_nothing_outside(
    hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    hub.repos["acme/Tiny-GGUF"].add("../../evil-Q4_0.gguf", b"GGUF" * 10)
    before = all_files_under(tmp_path)
    code, _, err = pull(capsys, "acme/Tiny-GGUF", "../../evil-Q4_0.gguf")
    assert code == 1
    assert_one_error_line(err, "refusing the file '../../evil-Q4_0.gguf'")
    code, _, err = pull(capsys, "acme/Tiny-GGUF", "--quant", "Q4_0")
    assert code == 1
    assert_one_error_line(err, "refusing the file '../../evil-Q4_0.gguf'")
    assert all_files_under(tmp_path) == before
    assert own_ids(capsys) == []


def test_cli_repo_whose_only_gguf_is_refused_says_why(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.add_repo("acme/Only-Hostile").add("../../evil-Q4_0.gguf", b"GGUF" * 10)
    code, _, err = pull(capsys, "acme/Only-Hostile")
    assert code == 1
    assert_one_error_line(err, "no GGUF file Peregrine can accept", "'../../evil-Q4_0.gguf'")


def test_cli_negative_size_and_rate_limit(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    key = "acme/Tiny-GGUF/Tiny-Q8_0.gguf"
    hub.inject("resolve", key, Fault(headers={"X-Linked-Size": "-1"}))
    code, _, err = pull(capsys, "acme/Tiny-GGUF", "--quant", "Q8_0")
    assert code == 1
    assert_one_error_line(err, "impossible size")
    hub.inject("resolve", key, Fault(status=429, retry_after="86400"))
    code, _, err = pull(capsys, "acme/Tiny-GGUF", "--quant", "Q8_0")
    assert code == 1
    assert_one_error_line(err, "HTTP 429", "retry in 86400 s")
    assert own_ids(capsys) == []


def test_cli_cut_connection_still_lands_a_verified_file(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "acme/Tiny-GGUF/Tiny-Q8_0.gguf"
    hub.inject("cdn", key, Fault(cut_after=5000))
    code, out, err = pull(capsys, "acme/Tiny-GGUF", "--quant", "Q8_0")
    assert code == 0, err
    final = Path(out.strip())
    assert sha_of(final) == hub.repos["acme/Tiny-GGUF"].files["Tiny-Q8_0.gguf"].sha256
    assert "retrying" in err
    assert own_ids(capsys) == ["acme/Tiny-GGUF/Tiny-Q8_0.gguf"]
