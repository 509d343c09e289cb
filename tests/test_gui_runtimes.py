"""Settings → Engine runtimes: listing, download with progress and cancel, remove.

The index and the pack come from a loopback server (tests/pack_server.py); the
pack is the installed llama-cpp-python's libraries, installed for real and
self-tested in a child process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytestqt.qtbot import QtBot

from app.qt.settings.runtimes import RuntimesController, RuntimesSection
from app.qt.workers import BackgroundCalls
from engine.paths import Paths
from tests.pack_server import PackServer, make_archive, running_pack_server, runtime_folder

pytestmark = pytest.mark.qt


@pytest.fixture(scope="module")
def pack_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    work = tmp_path_factory.mktemp("pack")
    return make_archive(runtime_folder(work), work / "cpu.tar.gz")


@pytest.fixture
def server(pack_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[PackServer]:
    with running_pack_server() as s:
        s.add_pack(pack_bytes)
        monkeypatch.setenv("PEREGRINE_RUNTIME_INDEX", s.index_url)
        yield s


def _section(qtbot: QtBot, in_use: str | None = None) -> tuple[RuntimesSection, BackgroundCalls]:
    background = BackgroundCalls()
    controller = RuntimesController(Paths.from_env(), background, lambda: in_use)
    section = RuntimesSection(controller)
    qtbot.addWidget(section)
    section.show()  # the first show reads the index
    qtbot.waitUntil(lambda: controller.snapshot is not None and not controller.loading)
    return section, background


def test_a_pack_downloads_with_progress_installs_and_is_removed(
    qtbot: QtBot, server: PackServer
) -> None:
    section, background = _section(qtbot, in_use="cpu")
    c = section.controller
    assert section.buttons["cpu"].text() == "Download"
    assert "suggested for this computer" in section.states["cpu"].text()
    seen: list[tuple[int, int]] = []
    c.progress.connect(lambda _n, done, total: seen.append((done, total)))
    section.buttons["cpu"].click()
    assert section.progress.isVisible() and section.buttons["cpu"].text() == "Cancel"
    qtbot.waitUntil(lambda: c.downloading is None and not c.loading, timeout=300_000)
    assert "Installed the cpu runtime; its self-test passed" in section.status.text()
    assert "next start" in section.status.text()
    assert seen and seen[-1][0] == seen[-1][1]
    assert section.buttons["cpu"].text() == "Remove"
    assert section.states["cpu"].text() == "self-test passed · in use"
    assert not section.progress.isVisible()
    assert (Paths.from_env().runtimes / "cpu" / "lib").is_dir()

    section.buttons["cpu"].click()
    qtbot.waitUntil(lambda: "Removed the cpu runtime" in section.status.text())
    qtbot.waitUntil(lambda: section.buttons.get("cpu") is not None and not c.loading)
    assert "running engine keeps it until its next start" in section.status.text()
    assert section.buttons["cpu"].text() == "Download"
    assert not (Paths.from_env().runtimes / "cpu").exists()
    section.controller.shutdown()
    background.shutdown()


def test_a_download_can_be_cancelled_and_leaves_nothing(
    qtbot: QtBot, server: PackServer, pack_bytes: bytes
) -> None:
    release = threading.Event()
    file = next(iter(n for n in server.files if n.endswith(".tar.gz")))
    server.gates[file] = (len(pack_bytes) // 2, release)
    section, background = _section(qtbot)
    c = section.controller
    paths = Paths.from_env()
    section.buttons["cpu"].click()
    # The server holds the answer at half the pack: the download is under way.
    qtbot.waitUntil(lambda: any(p.stat().st_size for p in paths.downloads.glob("*.part")))
    section.buttons["cpu"].click()  # Cancel
    release.set()
    qtbot.waitUntil(lambda: c.downloading is None and not c.loading, timeout=60_000)
    assert "cancelled" in section.status.text()
    assert section.buttons["cpu"].text() == "Download" and section.buttons["cpu"].isEnabled()
    assert not (paths.runtimes / "cpu").exists()
    assert not list(paths.downloads.glob("*.part"))
    section.controller.shutdown()
    background.shutdown()


def test_an_unreachable_index_still_lists_what_is_installed(
    qtbot: QtBot, monkeypatch: pytest.MonkeyPatch, server: PackServer
) -> None:
    runtime_folder(Paths.from_env().runtimes, name="mine")
    monkeypatch.setenv("PEREGRINE_RUNTIME_INDEX", f"{server.url}/missing.json")
    section, background = _section(qtbot)
    assert section.buttons["mine"].text() == "Remove"
    assert section.states["mine"].text() == "self-tested at first use"
    assert "Packs to download are not available" in section.status.text()
    assert "HTTP 404" in section.status.text()
    assert section.check.isEnabled()
    section.controller.shutdown()
    background.shutdown()


def test_the_settings_page_of_the_window_has_the_runtimes(qtbot: QtBot, tmp_path: Path) -> None:
    from app.qt.settings.controller import SettingsController
    from app.qt.settings.view import SettingsView
    from app.services.settings import Settings, SettingsStore

    background = BackgroundCalls()
    store = SettingsStore(tmp_path / "settings.json")
    view = SettingsView(
        SettingsController(store, Settings(), lambda m: None),
        RuntimesController(Paths.from_env(), background),
    )
    qtbot.addWidget(view)
    assert view.runtimes is not None
    assert view.runtimes.parent() is not None
    background.shutdown()
