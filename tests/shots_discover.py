"""Screenshots of Discover and Downloads against the loopback hub: `python -m tests.shots_discover DIR`.

Run under Xvfb (`xvfb-run -s "-screen 0 1400x900x24" python -m tests.shots_discover
docs/screenshots`). The hub (tests/fake_hub.py) serves repos shaped like real
ones: GGUF headers of Llama-3.1-8B in six quants (the data area a sparse hole of
the real size, so nothing big is written), a gated repo, and the built-in model.
Fit badges are planned for a described machine with an 8 GiB GPU and 32 GiB of
RAM. A throwaway PEREGRINE_HOME holds a paused download from "an earlier run".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from PySide6.QtGui import QFont
from PySide6.QtWidgets import QApplication

from app.qt.screenshots import Shots
from tests.fake_hub import FakeHub

GiB = 1 << 30
LLAMA = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF"
SHOTS = ("models-discover.png", "downloads.png")


def _fake_sha(path: Path) -> str:
    # The sparse files are never downloaded whole: a stand-in hash spares reading gigabytes.
    return hashlib.sha256(str(path).encode()).hexdigest()


def _stock_hub(folder: Path, default_model: Path) -> FakeHub:
    from tests import fake_hub
    from tests.planner_models import llama8b_like

    folder.mkdir(parents=True, exist_ok=True)
    hub = fake_hub.FakeHub().start()
    repo = hub.add_repo(LLAMA, downloads=1_254_301, likes=982)
    repo.last_modified = "2025-03-02T10:00:00.000Z"
    for quant in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"):
        path = llama8b_like(folder, quant)
        fake_hub._SHA_CACHE[path] = _fake_sha(path)
        repo.add(f"Meta-Llama-3.1-8B-Instruct-{quant}.gguf", path)
    (folder / "qat").mkdir()
    qat = llama8b_like(folder / "qat", "Q4_K_M")
    fake_hub._SHA_CACHE[qat] = _fake_sha(qat)
    repo.add("Meta-Llama-3.1-8B-Instruct-QAT-Q4_K_M.gguf", qat)
    for repo_id, downloads, likes, when in (
        ("lmstudio-community/Meta-Llama-3.1-8B-Instruct-GGUF", 402_118, 310, "2024-09-12"),
        ("unsloth/Llama-3.2-3B-Instruct-GGUF", 215_774, 141, "2025-01-20"),
        ("QuantFactory/Llama-3-8B-Instruct-Coder-GGUF", 8_412, 27, "2024-06-01"),
    ):
        r = hub.add_repo(repo_id, downloads=downloads, likes=likes)
        r.last_modified = f"{when}T12:00:00.000Z"
        r.add("model-Q4_K_M.gguf", b"GGUF")
    gated = hub.add_repo("meta-llama/Llama-3.1-8B-Instruct-GGUF", gated=True, downloads=98_120)
    gated.license = "llama3.1"
    gated.last_modified = "2024-12-06T12:00:00.000Z"
    gated.add("Llama-3.1-8B-Instruct-Q4_K_M.gguf", default_model)
    hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF").add(
        "SmolLM2-135M-Instruct-Q4_1.gguf", default_model
    )
    return hub


def _paused_from_an_earlier_run(home: Path, hub: FakeHub) -> None:
    """A partial Q6_K (2.1 GB, sparse) with its record, and the queue file naming it paused."""
    repo = hub.repos[LLAMA]
    name = "Meta-Llama-3.1-8B-Instruct-Q6_K.gguf"
    f = repo.files[name]
    downloads = home / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    stem = f"{LLAMA.replace('/', '--')}--{repo.commit[:12]}--{name}"
    with (downloads / f"{stem}.part").open("wb") as fh:
        fh.truncate(int(2.1e9))
    (downloads / f"{stem}.json").write_text(
        json.dumps(
            {
                "repo_id": LLAMA,
                "path": name,
                "commit": repo.commit,
                "sha256": f.sha256,
                "size": f.size,
                "url": "",
                "verified": False,
            }
        )
    )
    (downloads / "queue.json").write_text(
        json.dumps(
            {
                "version": 1,
                "downloads": [
                    {"repo_id": LLAMA, "files": [name], "revision": repo.commit, "state": "paused"}
                ],
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="peregrine-shots-"))
    os.environ["PEREGRINE_HOME"] = str(home)

    from app.qt.engine_supervisor import EngineSupervisor
    from app.qt.main_window import MainWindow
    from app.qt.models.discover_controller import HubWiring
    from app.qt.navigation import Page
    from app.services.chat.store import ChatStore
    from app.services.models.fit import planner_wiring
    from app.services.settings import Settings, SettingsStore
    from engine.default_model import default_model_path
    from engine.paths import Paths
    from engine.planning.hardware import CPU, GPU, RAM, Hardware

    hub = _stock_hub(home / "hub", default_model_path())
    os.environ["HF_ENDPOINT"] = hub.endpoint
    _paused_from_an_earlier_run(home, hub)
    paths = Paths.from_env().ensure()
    SettingsStore(paths.settings_file).save(Settings(theme="dark", library_scan_folders=[]))
    machine = Hardware(
        gpus=[GPU("NVIDIA GeForce RTX 4060", "cuda", 8 * GiB, int(7.6 * GiB), "8.9")],
        cpu=CPU("AMD Ryzen 7 7700", 8, 16, ["avx2"]),
        ram=RAM(32 * GiB, 26 * GiB),
        disk_free=500 * GiB,
    )
    fit, pick, reader = planner_wiring(machine)

    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))
    window = MainWindow(
        ChatStore(paths.chats_db),
        SettingsStore(paths.settings_file),
        EngineSupervisor(),
        default_model_path,
        paths=paths,
        fit=fit,
        hub_wiring=HubWiring(fit, pick, reader),
    )
    window.resize(1280, 820)
    window.show()
    shots = Shots(window, args.out)
    steps, shot, later = shots.steps, shots.shot, shots.later
    tab = window.models_view.discover

    def on_ready(_r: object) -> None:
        if steps or tab.search.text():
            return
        window.show_page(Page.MODELS)
        window.models_view.show_tab(tab)
        tab.search.setText("llama")
        window.discover.search_finished.connect(lambda *_a: later(200, open_repo))
        tab.query_submitted.emit("llama")

    def open_repo() -> None:
        if window.discover.result is None:
            window.discover.fit_finished.connect(lambda _r: later(300, discover_shot))
            tab.select_result(LLAMA)

    def discover_shot() -> None:
        if "models-discover.png" in steps:
            return
        shot("models-discover.png")
        hub.bytes_per_second = 30e6
        window.downloads.finished.connect(lambda _s: later(100, more_downloads))
        window.downloads.add(
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", ["SmolLM2-135M-Instruct-Q4_1.gguf"]
        )

    def more_downloads() -> None:
        if window.downloads.active > 2:
            return
        hub.bytes_per_second = 11e6
        # The gated one first: it fails at once (no token), as it would for a user.
        window.downloads.add(
            "meta-llama/Llama-3.1-8B-Instruct-GGUF", ["Llama-3.1-8B-Instruct-Q4_K_M.gguf"]
        )
        for quant in ("Q4_K_M", "QAT-Q4_K_M", "Q8_0"):
            window.downloads.add(LLAMA, [f"Meta-Llama-3.1-8B-Instruct-{quant}.gguf"])
        window.models_view.show_tab(window.models_view.downloads)
        later(6000, downloads_shot)

    def downloads_shot() -> None:
        shot("downloads.png")
        window.shut_down()

    window.supervisor.ready.connect(on_ready)
    shots.run(app, timeout_ms=240_000)
    window.store.close()
    hub.stop()
    shutil.rmtree(home, ignore_errors=True)
    return shots.report(SHOTS)


if __name__ == "__main__":
    raise SystemExit(main())
