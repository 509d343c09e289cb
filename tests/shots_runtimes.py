"""Screenshot of Settings → Engine runtimes: `python -m tests.shots_runtimes DIR`.

Run under Xvfb (`xvfb-run -s "-screen 0 1400x900x24" python -m tests.shots_runtimes
docs/screenshots`). A loopback server (tests/pack_server.py) serves an index
with a cpu, a vulkan and a cuda pack; the page is drawn for a described machine
with an NVIDIA GPU (driver 580.95), so both GPU packs suit it. The cpu runtime
is installed (the built-in llama.cpp's libraries) and self-tested for real; the
cuda pack is caught mid-download (the server holds its answer at 40 %).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

from app.qt.screenshots import Shots
from tests.pack_server import make_archive, running_pack_server, runtime_folder

SHOT = "settings-runtimes.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="peregrine-shots-"))
    os.environ["PEREGRINE_HOME"] = str(home)

    from app.qt.engine_supervisor import EngineSupervisor
    from app.qt.main_window import MainWindow
    from app.qt.navigation import Page
    from app.services.chat.store import ChatStore
    from app.services.runtimes import load_snapshot
    from app.services.settings import Settings, SettingsStore
    from engine.default_model import default_model_path
    from engine.paths import Paths
    from engine.runtime_packs import describe_machine
    from engine.runtimes import RuntimeSelector

    paths = Paths.from_env().ensure()
    SettingsStore(paths.settings_file).save(Settings(theme="dark", library_scan_folders=[]))
    runtime_folder(paths.runtimes)
    RuntimeSelector(paths).check("cpu")  # the real self-test: the page shows it passed
    release = threading.Event()
    with running_pack_server() as server:
        server.add_pack(make_archive(runtime_folder(home / "src"), home / "cpu.tar.gz"))
        server.add_pack(
            bytes(48_000_000), name="vulkan", backend="vulkan", requires={"gpu": "vulkan"}
        )
        cuda = bytes(96_000_000)
        entry = server.add_pack(
            cuda, name="cuda", backend="cuda", requires={"gpu": "nvidia", "min_driver": "580.65"}
        )
        server.gates[entry["url"]] = (int(len(cuda) * 0.4), release)
        os.environ["PEREGRINE_RUNTIME_INDEX"] = server.index_url
        nvidia = describe_machine(
            ["cuda"], driver=lambda: "nvidia 580.95.05", vulkan_loader=lambda: True
        )

        app = QApplication([sys.argv[0]])
        app.setFont(QFont("DejaVu Sans", 10))
        window = MainWindow(
            ChatStore(paths.chats_db),
            SettingsStore(paths.settings_file),
            EngineSupervisor(),
            default_model_path,
            paths=paths,
        )
        # The described machine instead of this one (which may have no GPU).
        window.runtimes.snapshot_fn = lambda p: load_snapshot(p, machine=lambda _p: nvidia)
        window.resize(1280, 820)
        window.show()
        shots = Shots(window, args.out)
        later = shots.later
        section = window.settings_view.runtimes
        assert section is not None

        def on_ready(_r: object) -> None:
            if shots.steps or window.runtimes.snapshot is not None:
                return
            window.show_page(Page.SETTINGS)
            window.runtimes.changed.connect(start_download)

        def start_download() -> None:
            snap = window.runtimes.snapshot
            if snap is None or window.runtimes.loading or window.runtimes.downloading:
                return
            window.runtimes.changed.disconnect(start_download)
            window.runtimes.download("cuda")
            later(1500, take)

        def take() -> None:
            window.settings_view.ensureWidgetVisible(section, 0, 0)
            window.settings_view.verticalScrollBar().setValue(section.y() - 80)
            later(300, finish)

        def finish() -> None:
            shots.shot(SHOT)
            release.set()
            window.runtimes.cancel()
            window.shut_down()

        window.supervisor.ready.connect(on_ready)
        shots.run(app, timeout_ms=240_000)
        release.set()
        window.store.close()
    return shots.report([SHOT])


if __name__ == "__main__":
    raise SystemExit(main())
