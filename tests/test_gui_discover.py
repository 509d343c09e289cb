"""Discover and Downloads in the real window against the loopback hub (pytest-qt, offscreen).

HF_ENDPOINT points at tests/fake_hub.py's hub; fit badges come from the real
planner for a described machine (an 8 GiB GPU). Each flow is driven as a user
would: typing a search, clicking a result, a quant, Download, the row's Pause,
Resume and Load buttons, quitting and starting the app again.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from PySide6.QtCore import Qt
from pytestqt.qtbot import QtBot

from app.qt.main_window import MainWindow
from app.qt.models.discover_controller import HubWiring
from app.qt.models.downloads_controller import default_downloader
from app.qt.models.downloads_tab import DownloadRow
from app.qt.navigation import Page
from app.services.models.downloads import Downloader, FailureKind, JobState
from app.services.models.fit import planner_wiring
from app.services.settings import Settings
from engine.paths import Paths
from engine.planning.hardware import CPU, GPU, RAM, Hardware
from tests.fake_hub import VALID_TOKEN, FakeHub, add_tiny_repo, running_hub
from tests.gui_windows import close_window, make_window

pytestmark = [pytest.mark.qt, pytest.mark.slow]

GiB = 1 << 30
SMOL = "acme/SmolLM2-135M-Instruct-GGUF"
SMOL_FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"
BLOB = "acme/Blob-GGUF"
BLOB_FILE = "Blob-Q4_0.gguf"
BLOB_SIZE = 3 * 1024 * 1024 + 4321
GATED = "acme/Gated-GGUF"
LOAD_MS = 180_000

MACHINE = Hardware(
    gpus=[GPU("NVIDIA GeForce RTX 4060", "cuda", 8 * GiB, int(7.6 * GiB), "8.9")],
    cpu=CPU("Test CPU", 8, 16, ["avx2"]),
    ram=RAM(32 * GiB, 26 * GiB),
    disk_free=500 * GiB,
)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model: Path) -> Iterator[FakeHub]:
    with running_hub() as h:
        add_tiny_repo(h, tmp_path / "tiny")
        h.add_repo(SMOL, downloads=52_000, likes=130).add(SMOL_FILE, default_model)
        h.add_repo(BLOB).add(BLOB_FILE, os.urandom(BLOB_SIZE))
        h.add_repo(GATED, gated=True).add("Gated-Q4_0.gguf", default_model)
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def window(qtbot: QtBot, model: Path, **extra: Any) -> MainWindow:
    fit, pick, reader = planner_wiring(MACHINE)
    return make_window(qtbot, model, hub_wiring=HubWiring(fit, pick, reader), **extra)


def row(w: MainWindow, job_id: str) -> DownloadRow:
    return w.models_view.downloads.rows[job_id]


def status(w: MainWindow, job_id: str) -> Any:
    return w.downloads.statuses.get(job_id)


def done_of(w: MainWindow, job_id: str) -> int:
    st = status(w, job_id)
    return st.done if st is not None else 0


def wait_state(qtbot: QtBot, w: MainWindow, job_id: str, state: JobState, ms: int = 60_000) -> Any:
    qtbot.waitUntil(
        lambda: status(w, job_id) is not None and status(w, job_id).state is state, timeout=ms
    )
    return status(w, job_id)


def partial_of(repo: str, file: str) -> Path:
    found = list(Paths.from_env().downloads.glob(f"{repo.replace('/', '--')}--*--{file}.part"))
    assert len(found) == 1, found
    return found[0]


def final_of(repo: str, file: str) -> Path:
    return Paths.from_env().models / repo.replace("/", "--") / file


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nothing_reaches_the_hub_before_the_first_search(
    qtbot: QtBot, hub: FakeHub, default_model: Path
) -> None:
    w = window(qtbot, default_model)
    w.show_page(Page.MODELS)
    tab = w.models_view.discover
    w.models_view.show_tab(tab)
    qtbot.waitUntil(lambda: not w.models.listing, timeout=60_000)
    qtbot.wait(600)  # longer than the search debounce
    assert hub.requests == []
    assert "Nothing is sent" in tab.status.text()
    # Typing is searching: one request for the whole word (debounced), none per key.
    with qtbot.waitSignal(w.discover.search_finished, timeout=30_000) as found:
        qtbot.keyClicks(tab.search, "tiny")
    assert found.args == ["tiny", 1]
    searches = [r for r in hub.requests if r.path == "/api/models"]
    assert len(searches) == 1
    assert tab.results_model.rowCount() == 1
    cells = [tab.results_model.data(tab.results_model.index(0, c)) for c in range(4)]
    assert cells[0] == "Tiny-GGUF · acme" and cells[1] == "100" and cells[2] == "10"
    assert cells[3].endswith("ago")
    # Clearing the box sends nothing.
    before = len(hub.requests)
    tab.search.clear()
    tab.query_edited.emit("")
    qtbot.wait(600)
    assert len(hub.requests) == before and tab.results_model.rowCount() == 0
    close_window(qtbot, w)


def test_search_open_download_watch_progress_see_it_in_the_library_and_load(
    qtbot: QtBot, hub: FakeHub, default_model: Path
) -> None:
    hub.bytes_per_second = 40e6  # about 2.5 s for the 98 MB model: progress is visible
    w = window(qtbot, default_model)
    w.show_page(Page.MODELS)
    tab = w.models_view.discover
    w.models_view.show_tab(tab)
    with qtbot.waitSignal(w.discover.search_finished, timeout=30_000):
        qtbot.keyClicks(tab.search, "smollm2")
        qtbot.keyClick(tab.search, Qt.Key.Key_Return)
    assert tab.select_result(SMOL)
    with qtbot.waitSignal(w.discover.fit_finished, timeout=60_000):
        pass
    [opt] = tab.quants_model.options
    assert opt.fit is not None and opt.fit.level == "gpu"  # 98 MB on an 8 GiB GPU
    assert opt.picked and "★ Recommended" in tab.quants_model.data(tab.quants_model.index(0, 3))
    assert tab.quants_model.data(tab.quants_model.index(0, 2)) == "Fits in GPU"
    assert tab.quants_model.data(tab.quants_model.index(0, 1)).endswith("MB")
    assert tab.selected_option() is not None and tab.download_button.isEnabled()
    seen: list[Any] = []
    w.downloads.status_changed.connect(seen.append)
    tab.download_button.click()
    assert w.models_view.tabs.currentWidget() is w.models_view.downloads
    qtbot.waitUntil(lambda: len(w.downloads.statuses) == 1, timeout=10_000)
    [job_id] = w.downloads.statuses
    done = wait_state(qtbot, w, job_id, JobState.DONE, ms=120_000)
    # Progress came as data while it ran: partial figures, speed, time left, bar drawn.
    running = [s for s in seen if s.state is JobState.RUNNING and 0 < s.done < s.total]
    assert running and any(s.speed > 0 and s.eta is not None for s in running)
    assert final_of(SMOL, SMOL_FILE) in done.paths
    assert sha(final_of(SMOL, SMOL_FILE)) == sha(default_model)
    r = row(w, job_id)
    assert r.load.isVisibleTo(r) and not r.pause.isVisibleTo(r)
    assert "in the library" in r.figures.text()
    qtbot.waitUntil(
        lambda: final_of(SMOL, SMOL_FILE) in [e.path for e in w.models.entries], timeout=60_000
    )
    # Load starts the engine with the downloaded model (none was running).
    r.load.click()
    qtbot.waitUntil(lambda: w.engine.current == final_of(SMOL, SMOL_FILE), timeout=LOAD_MS)
    close_window(qtbot, w)


def test_pause_and_resume_from_the_panel(qtbot: QtBot, hub: FakeHub, default_model: Path) -> None:
    hub.bytes_per_second = 1e6
    w = window(qtbot, default_model)
    job_id = w.downloads.add(BLOB, [BLOB_FILE])
    qtbot.waitUntil(lambda: done_of(w, job_id) > 300_000, timeout=30_000)
    r = row(w, job_id)
    assert r.pause.isVisibleTo(r) and not r.resume.isVisibleTo(r)
    r.pause.click()
    paused = wait_state(qtbot, w, job_id, JobState.PAUSED)
    kept = partial_of(BLOB, BLOB_FILE).stat().st_size
    assert 0 < kept < BLOB_SIZE and paused.done <= kept
    assert r.resume.isVisibleTo(r) and not r.pause.isVisibleTo(r)
    hub.bytes_per_second = None
    requests_before = len(hub.file_requests(BLOB, BLOB_FILE))
    r.resume.click()
    wait_state(qtbot, w, job_id, JobState.DONE)
    resumed = hub.file_requests(BLOB, BLOB_FILE)[requests_before]
    assert resumed.range == f"bytes={kept}-" and resumed.served == BLOB_SIZE - kept
    assert sha(final_of(BLOB, BLOB_FILE)) == hub.repos[BLOB].files[BLOB_FILE].sha256
    close_window(qtbot, w)


def test_quit_mid_download_and_the_next_start_resumes_from_the_bytes_on_disk(
    qtbot: QtBot, hub: FakeHub, default_model: Path
) -> None:
    hub.bytes_per_second = 1e6
    w = window(qtbot, default_model)
    job_id = w.downloads.add(BLOB, [BLOB_FILE])
    qtbot.waitUntil(lambda: done_of(w, job_id) > BLOB_SIZE // 3, timeout=30_000)
    close_window(qtbot, w)
    kept = partial_of(BLOB, BLOB_FILE).stat().st_size
    assert BLOB_SIZE // 3 < kept < BLOB_SIZE
    queue_file = Paths.from_env().downloads / "queue.json"
    assert '"state": "queued"' in queue_file.read_text()
    requests_before = len(hub.file_requests(BLOB, BLOB_FILE))
    hub.bytes_per_second = None
    # The next start: the queue comes back and continues by itself.
    again = window(qtbot, default_model)
    qtbot.waitUntil(lambda: len(again.downloads.statuses) == 1, timeout=10_000)
    [new_id] = again.downloads.statuses
    done = wait_state(qtbot, again, new_id, JobState.DONE)
    resumed = hub.file_requests(BLOB, BLOB_FILE)[requests_before]
    assert resumed.range == f"bytes={kept}-"
    assert resumed.served == BLOB_SIZE - kept
    assert done.paths == (final_of(BLOB, BLOB_FILE),)
    assert sha(final_of(BLOB, BLOB_FILE)) == hub.repos[BLOB].files[BLOB_FILE].sha256
    close_window(qtbot, again)
    assert '"downloads": []' in queue_file.read_text()


class FullDisk:
    """Opens partial files like the real writer; writes fail with ENOSPC past `limit` bytes."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit

    def __call__(self, path: Path) -> BinaryIO:
        fh = path.open("ab")
        disk = self

        class Writer:
            def write(self, data: bytes) -> int:
                if disk.limit is not None:
                    room = disk.limit - fh.tell()
                    if len(data) > room:
                        fh.write(data[: max(room, 0)])
                        raise OSError(errno.ENOSPC, "No space left on device")
                return fh.write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(fh, name)

        return Writer()  # type: ignore[return-value]


FAILURES = {
    "hub timeout": (FailureKind.NETWORK, "No connection to Hugging Face"),
    "gated repo": (FailureKind.ACCESS, "Accept its licence"),
    "disk full": (FailureKind.DISK_FULL, "The disk is full"),
    "corrupted transfer": (FailureKind.CHECKSUM, "checksum mismatch"),
    "server errors": (FailureKind.SERVER, "servers kept failing"),
}


@pytest.mark.parametrize("fault", list(FAILURES))
def test_each_failure_reads_plainly_and_loses_nothing_on_disk(
    qtbot: QtBot,
    hub: FakeHub,
    default_model: Path,
    fault: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind, words = FAILURES[fault]
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "0.5")
    disk = FullDisk(None)

    def make(paths: Paths, settings: Settings) -> Downloader:
        downloader = default_downloader(paths, settings)
        downloader._open_writer = disk
        return downloader

    # A model already downloaded: no failure may touch it.
    kept_model = Paths.from_env().ensure().models / "acme--Old-GGUF" / "Old-Q4_0.gguf"
    kept_model.parent.mkdir(parents=True)
    kept_model.write_bytes(b"GGUF" + b"\0" * 1000)
    w = window(qtbot, default_model, make_downloader=make)
    repo, file = (GATED, "Gated-Q4_0.gguf") if fault == "gated repo" else (BLOB, BLOB_FILE)
    key = f"{repo}/{file}"
    # Half the file arrives first (a pause), so a kept partial can be checked.
    if fault != "gated repo":
        hub.bytes_per_second = 2e6
        job_id = w.downloads.add(repo, [file])
        qtbot.waitUntil(lambda: done_of(w, job_id) > 400_000, timeout=30_000)
        w.downloads.queue.pause(job_id)
        wait_state(qtbot, w, job_id, JobState.PAUSED)
        hub.bytes_per_second = None
        before = partial_of(repo, file).stat().st_size
    else:
        job_id = w.downloads.add(repo, [file])
        before = 0
    if fault == "hub timeout":
        from tests.fake_hub import Fault

        hub.inject("resolve", key, Fault(stall=True, times=None))
    elif fault == "disk full":
        disk.limit = before + 500_000
    elif fault == "corrupted transfer":
        hub.corrupt.add(key)
        # The kept bytes are fetched once more from byte 0 before the file is called corrupt.
    elif fault == "server errors":
        from tests.fake_hub import Fault

        hub.inject("cdn", key, Fault(status=503, retry_after="0", times=None))
    if fault != "gated repo":
        w.downloads.queue.resume(job_id)
    failed = wait_state(qtbot, w, job_id, JobState.FAILED)
    assert failed.kind is kind
    r = row(w, job_id)
    assert r.problem.isVisibleTo(r) and words in r.problem.text()
    assert r.resume.isVisibleTo(r) and r.cancel.isVisibleTo(r)
    # Nothing already on disk was lost.
    assert kept_model.read_bytes() == b"GGUF" + b"\0" * 1000
    if fault == "corrupted transfer":
        # Bytes that do not hash right cannot be trusted: they (and only they) are deleted.
        assert not list(Paths.from_env().downloads.glob("*.part"))
    elif fault == "disk full":
        assert partial_of(repo, file).stat().st_size == before + 500_000
    elif fault != "gated repo":
        assert partial_of(repo, file).stat().st_size == before
    assert not final_of(repo, file).exists()
    # The way out works: fix the cause, Resume (or Retry), and the download completes.
    hub.faults.clear()
    hub.corrupt.clear()
    disk.limit = None
    if fault == "gated repo":
        assert w.settings.set_hf_token(VALID_TOKEN) is None
    r.resume.click()
    wait_state(qtbot, w, job_id, JobState.DONE)
    assert sha(final_of(repo, file)) == hub.repos[repo].files[file].sha256
    close_window(qtbot, w)


def test_a_gated_repo_says_so_and_what_to_do(
    qtbot: QtBot, hub: FakeHub, default_model: Path
) -> None:
    opened: list[Any] = []
    w = window(qtbot, default_model, open_url=lambda u: opened.append(u) or True)
    tab = w.models_view.discover
    w.show_page(Page.MODELS)
    w.models_view.show_tab(tab)
    with qtbot.waitSignal(w.discover.search_finished, timeout=30_000):
        tab.query_submitted.emit("gated")
    assert tab.select_result(GATED)
    with qtbot.waitSignal(w.discover.fit_finished, timeout=60_000):
        pass
    assert tab.gated.isVisibleTo(tab)
    assert "gated" in tab.gated_text.text() and "token in Settings" in tab.gated_text.text()
    [opt] = tab.quants_model.options
    assert opt.fit is None and opt.header_error and "gated or private" in opt.header_error
    assert tab.quants_model.data(tab.quants_model.index(0, 2)) == "unknown"
    assert "(gated)" in tab.results_model.data(tab.results_model.index(0, 0))
    tab.gated_open.click()
    assert [u.toString() for u in opened] == [f"https://huggingface.co/{GATED}"]
    tab.gated_settings.click()
    assert w.page is Page.SETTINGS
    close_window(qtbot, w)


def test_the_download_limit_from_settings_holds(
    qtbot: QtBot, hub: FakeHub, default_model: Path
) -> None:
    hub.bytes_per_second = 1e6
    w = window(qtbot, default_model, settings=Settings(downloads_at_once=1))
    first = w.downloads.add(BLOB, [BLOB_FILE])
    second = w.downloads.add(SMOL, [SMOL_FILE])
    wait_state(qtbot, w, first, JobState.RUNNING)
    qtbot.wait(300)
    assert status(w, second).state is JobState.QUEUED
    assert w.downloads.add(BLOB, [BLOB_FILE]) == first  # no second job for the same file
    # Raised in Settings: the waiting one starts at once.
    w.settings_view.downloads_at_once.setCurrentText("2")
    wait_state(qtbot, w, second, JobState.RUNNING)
    assert w.settings.settings.downloads_at_once == 2
    close_window(qtbot, w)
