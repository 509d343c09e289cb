"""The VRAM-budget wizard: screenshots and the redraw time of a dragged budget slider.

    xvfb-run -a -s "-screen 0 1400x900x24" python -m bench.wizard docs/screenshots

- `wizard.png`: a described laptop (8 GB GPU, 32 GB RAM) planning a Qwen3-30B-A3B
  shaped Q4_K_M (a sparse GGUF with the real header, tests/planner_models.py);
- `wizard-cpu.png`: this machine with the built-in model, after the dry run;
- `bench/results/wizard_redraw.json`: the GPU budget slider dragged over its
  range, one step per 128 MiB: the time from the slider's move to the bar
  repainted (service + drawing + paint), median and worst.

A throwaway PEREGRINE_HOME is used; no real settings are touched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--results", type=Path, default=Path("bench/results/wizard_redraw.json"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="peregrine-wizard-"))
    os.environ["PEREGRINE_HOME"] = str(home)

    from PySide6.QtGui import QFont
    from PySide6.QtWidgets import QApplication

    from app.qt.main_window import MainWindow
    from app.services.models.fit import HardwareSource
    from app.services.settings import Settings, SettingsStore
    from engine.default_model import default_model_path
    from engine.paths import Paths
    from engine.planning.hardware import CPU, GPU, RAM, Hardware
    from tests.planner_models import qwen3moe_like

    paths = Paths.from_env().ensure()
    SettingsStore(paths.settings_file).save(Settings(theme="dark", library_scan_folders=[]))
    laptop = Hardware(
        gpus=[GPU("NVIDIA GeForce RTX 4060 Laptop GPU", "cuda", 8 * GIB, int(7.6 * GIB), "8.9")],
        cpu=CPU("AMD Ryzen 7 7840HS", 8, 16, ["avx2", "avx512f", "fma", "f16c"]),
        ram=RAM(32 * GIB, 26 * GIB),
        disk_free=400 * GIB,
    )
    model = qwen3moe_like(paths.models)

    app = QApplication([sys.argv[0]])
    app.setFont(QFont("DejaVu Sans", 10))

    def settle(ms: int) -> None:
        end = time.monotonic() + ms / 1000
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(what: str, ok: object, timeout_s: float = 180.0) -> None:
        end = time.monotonic() + timeout_s
        while not ok():  # type: ignore[operator]
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            app.processEvents()
            time.sleep(0.01)

    # A described 8 GB laptop.
    described = MainWindow.on_profile(
        max_tokens=64, hardware=HardwareSource(laptop, file="laptop-8gb.json")
    )
    wizard = described.wizard
    dialog = wizard.open(model)
    wait("the described plan", lambda: wizard.wizard is not None and bool(wizard.redraw_seconds))
    settle(400)
    dialog.grab().save(str(args.out / "wizard.png"))

    # The responsiveness figure: drag the GPU budget down its range.
    slider = dialog.budget_rows[0].slider
    steps = []
    for mib in range(slider.maximum(), 1024, -128):
        start = time.perf_counter()
        slider.setValue(mib)
        app.processEvents()
        steps.append(time.perf_counter() - start)
    settle(300)
    dialog.close()

    # This machine with the built-in model, measured by the dry run.
    here = MainWindow.on_profile(max_tokens=64)
    cpu_wizard = here.wizard
    cpu_dialog = cpu_wizard.open(default_model_path())
    wait("the dry run", lambda: "Measured" in cpu_dialog.method.text())
    settle(400)
    cpu_dialog.grab().save(str(args.out / "wizard-cpu.png"))
    cpu_dialog.close()

    result = {
        "command": "xvfb-run -a -s '-screen 0 1400x900x24' python -m bench.wizard docs/screenshots",
        "machine": "described 8 GB laptop, Qwen3-30B-A3B shaped Q4_K_M",
        "steps": len(steps),
        "median_ms": round(statistics.median(steps) * 1000, 1),
        "worst_ms": round(max(steps) * 1000, 1),
        "load_average": os.getloadavg()[0],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    for window in (described, here):
        window.store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
