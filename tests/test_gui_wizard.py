"""The VRAM-budget wizard (pytest-qt, offscreen) on described machines and on this one.

On four described machines the bars must show exactly what `peregrine profile
--json` prints for the same inputs (model, budgets, context, KV types), follow
every change, and Apply must send exactly those settings. On this machine a
real dry run marks the figures measured, and Apply loads through the real
engine's `/v1/engine/load`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QApplication, QWidget
from pytestqt.qtbot import QtBot

from app.cli import main as peregrine
from app.qt import theme
from app.qt.navigation import Page
from app.qt.wizard.controller import WizardController
from app.qt.workers import BackgroundCalls
from app.services.engine.client import EngineClient
from app.services.models.fit import HardwareSource
from app.services.settings import Settings, SettingsStore
from engine.paths import Paths
from engine.planning.hardware import CPU, GPU, RAM, Hardware
from engine.wire.control import LoadRequest
from tests.gui_windows import make_window
from tests.planner_models import llama8b_like, llama70b_like, qwen3moe_like

pytestmark = [pytest.mark.qt]

GiB = 1 << 30
CPU_8 = CPU("AMD Ryzen 7 7840HS", 8, 16, ["avx2", "fma", "avx512f"])
MACHINES = {
    "cpu-16gb": Hardware([], CPU_8, RAM(16 * GiB, 14 * GiB), 200 * GiB),
    "gpu-8gb": Hardware(
        [GPU("NVIDIA GeForce RTX 4060 Laptop GPU", "cuda", 8 * GiB, int(7.6 * GiB), "8.9")],
        CPU_8,
        RAM(32 * GiB, 26 * GiB),
        200 * GiB,
    ),
    "gpu-24gb": Hardware(
        [GPU("NVIDIA GeForce RTX 4090", "cuda", 24 * GiB, int(23.4 * GiB), "8.9")],
        CPU_8,
        RAM(64 * GiB, 52 * GiB),
        200 * GiB,
    ),
    "two-gpus": Hardware(
        [
            GPU("NVIDIA GeForce RTX 3060", "cuda", 12 * GiB, int(11.5 * GiB), "8.6"),
            GPU("NVIDIA GeForce RTX 3090", "cuda", 24 * GiB, int(23.2 * GiB), "8.6"),
        ],
        CPU_8,
        RAM(64 * GiB, 52 * GiB),
        200 * GiB,
    ),
}
# The model each machine is planned with: the interesting case for each.
MODELS = {
    "cpu-16gb": llama8b_like,  # CPU only, context to fit RAM
    "gpu-8gb": qwen3moe_like,  # MoE: experts of the first layers in RAM (n_cpu_moe)
    "gpu-24gb": llama8b_like,  # all on the GPU, full context
    "two-gpus": llama70b_like,  # partial offload split over two unequal GPUs
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: build(folder) for name, build in MODELS.items()}


class RecordingEngine(QObject):
    """The engine controller's load seam: records every LoadRequest Apply sends."""

    load_progress = Signal(float)
    load_finished = Signal(str)
    load_failed = Signal(str, str)

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[LoadRequest] = []

    def load_with(self, model: Path, request: LoadRequest) -> bool:
        self.requests.append(request)
        return True


class FakeSettings:
    settings = Settings()


class Asked:
    """Stands in for the confirmation dialog."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.questions: list[str] = []

    def __call__(self, title: str, question: str, action: str) -> bool:
        self.questions.append(question)
        return self.answer


def hardware_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(MACHINES[name].to_json()))
    return path


def profile(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    code = peregrine(["profile", "--json", "--estimate-only", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


@pytest.fixture
def wizard_on(qtbot: QtBot, tmp_path: Path) -> Iterator[Any]:
    """Opens the wizard for (machine, model) with a recording engine and a confirm stand-in."""
    made: list[WizardController] = []

    def open_(name: str, model: Path, asked: Asked | None = None) -> WizardController:
        window = QWidget()
        qtbot.addWidget(window)
        engine = RecordingEngine()
        source = HardwareSource(MACHINES[name], file=str(hardware_file(tmp_path, name)))
        controller = WizardController(
            window,
            theme.DARK,
            source,
            engine,  # type: ignore[arg-type]
            FakeSettings(),  # type: ignore[arg-type]
            BackgroundCalls(),
            asked or Asked(True),
            lambda: [],
            measure_fn=lambda _load: pytest.fail("a described machine is never dry-run"),
            apply_fn=engine.load_with,
            parent=window,  # gone with the window: no timer of it outlives the test
        )
        with qtbot.waitSignal(controller.redrawn, timeout=30_000):
            controller.open(model)  # the dialog is the window's child: deleted with it
        made.append(controller)
        return controller

    yield open_
    for c in made:
        if c.dialog is not None:
            c.dialog.close()


def bar_figures(controller: WizardController) -> dict[str, dict[str, int]]:
    """What the bars show, per device name."""
    assert controller.dialog is not None and controller.wizard is not None
    return {
        name: bar.figures()
        for name, bar in zip(controller.wizard.names, controller.dialog.bars, strict=True)
    }


def assert_bars_equal_profile(controller: WizardController, data: dict[str, Any]) -> None:
    shown = bar_figures(controller)
    devices = {d["name"]: d for d in data["memory"]["devices"]}
    for name, figures in shown.items():
        expected = devices.get(name, {"weights": 0, "kv": 0, "compute": 0, "total": 0})
        assert figures["weights"] == expected["weights"], name
        assert figures["kv"] == expected["kv"], name
        assert figures["compute"] == expected["compute"], name
        assert figures["total"] == expected["total"], name
    assert sum(f["total"] for f in shown.values()) == data["memory"]["total"]
    assert sum(f["overhead"] for f in shown.values()) == data["memory"]["overhead"]


@pytest.mark.parametrize("machine", list(MACHINES))
def test_bars_equal_profile_json_follow_changes_and_apply_sends_them(
    machine: str,
    models: dict[str, Path],
    wizard_on: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = models[machine]
    hw = str(hardware_file(tmp_path, machine))
    controller = wizard_on(machine, model)
    dialog = controller.dialog
    assert dialog is not None

    # Opened with the planner's recommendation: the bars are profile's figures.
    planned = profile(capsys, "--hardware", hw, "--model", str(model))
    assert_bars_equal_profile(controller, planned)
    assert "Estimated" in dialog.method.text() and "described machine" in dialog.method.text()
    assert dialog.problems.isHidden()
    assert dialog.rec_summary.text().startswith(f"{planned['plan']['load']['n_ctx']:,} tokens")
    before = bar_figures(controller)

    # The user shortens the context and picks a q8_0 cache: the bars follow at once
    # (the same call, no event-loop turn in between) and equal profile's for those pins.
    dialog.ctx.setValue(4096)
    dialog.type_k.setCurrentText("q8_0")
    dialog.type_v.setCurrentText("q8_0")
    after = bar_figures(controller)
    assert after != before
    pinned = profile(
        capsys,
        "--hardware",
        hw,
        "--model",
        str(model),
        "--ctx",
        "4096",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
    )
    assert_bars_equal_profile(controller, pinned)

    # Apply sends exactly those settings.
    engine = controller.engine
    assert isinstance(engine, RecordingEngine)
    dialog.apply_button.click()
    assert len(engine.requests) == 1
    assert engine.requests[0].model_dump() == pinned["plan"]["load"]


def test_per_device_budgets_equal_profile_budget_gib(
    models: dict[str, Path],
    wizard_on: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two sliders and the RAM slider are `--budget-gib 6,10,40`."""
    model = models["two-gpus"]
    controller = wizard_on("two-gpus", model)
    dialog = controller.dialog
    for row, value in zip(dialog.budget_rows, (6, 10, 40), strict=True):
        row.slider.setValue(value * 1024)
    assert controller.wizard.budgets == [6 * GiB, 10 * GiB, 40 * GiB]
    data = profile(
        capsys,
        "--hardware",
        str(hardware_file(tmp_path, "two-gpus")),
        "--model",
        str(model),
        "--budget-gib",
        "6,10,40",
    )
    # The sliders change the recommendation; take it, and the bars are profile's.
    dialog.use_recommended.click()
    assert_bars_equal_profile(controller, data)
    assert controller.wizard.request().model_dump() == data["plan"]["load"]
    assert data["plan"]["load"]["tensor_split"] is not None  # both GPUs hold layers


def test_a_budget_below_the_need_is_said_before_loading(
    models: dict[str, Path], wizard_on: Any
) -> None:
    asked = Asked(False)
    controller = wizard_on("cpu-16gb", models["cpu-16gb"], asked)
    dialog = controller.dialog
    assert dialog.problems.isHidden()
    need = controller.wizard.view().bars[-1].used
    # The RAM slider dragged below what the model takes at this context.
    dialog.budget_rows[-1].slider.setValue(int(need / GiB * 1024) // 2)
    assert not dialog.problems.isHidden()
    text = dialog.problems.text()
    assert "System RAM needs" in text and "budget is" in text
    assert dialog.apply_button.text() == "Load anyway…"
    dialog.apply_button.click()
    assert asked.questions and "do not fit the budgets" in asked.questions[0]
    assert controller.engine.requests == []  # declined: nothing was sent
    assert "Not loaded" in dialog.status.text()
    # "Use recommended" finds what fits the smaller budget (a shorter context).
    dialog.use_recommended.click()
    assert dialog.problems.isHidden()
    assert controller.wizard.choices.n_ctx < 131072


def test_a_model_larger_than_the_machine_is_said_and_manual_placement_is_sent(
    models: dict[str, Path], wizard_on: Any
) -> None:
    asked = Asked(True)
    controller = wizard_on("gpu-8gb", models["cpu-16gb"], asked)  # the 8B on the laptop
    dialog = controller.dialog
    # All layers on the GPU by hand, at the full context: far over the 6.6 GiB budget.
    dialog.auto_placement.setChecked(False)
    dialog.ctx.setValue(131072)
    dialog.type_k.setCurrentText("f16")
    dialog.type_v.setCurrentText("f16")
    dialog.gpu_layers.setValue(33)
    view = controller.wizard.view()
    assert any("CUDA0" in p and "over" in p for p in view.problems)
    assert "loading would fail" in dialog.problems.text()  # more than the GPU's free memory
    dialog.apply_button.click()
    assert len(asked.questions) == 1
    sent = controller.engine.requests[-1]
    assert (sent.n_ctx, sent.n_gpu_layers, sent.type_k, sent.type_v) == (131072, -1, "f16", "f16")
    # 20 of 33 layers by hand: the request says so, and auto placement stays off.
    controller.applying = None
    dialog.gpu_layers.setValue(20)
    assert not dialog.auto_placement.isChecked()
    assert controller.wizard.request().n_gpu_layers == 20


def test_moe_experts_in_ram_and_a_quantized_v_without_flash_attention(
    models: dict[str, Path], wizard_on: Any
) -> None:
    controller = wizard_on("gpu-8gb", models["gpu-8gb"])
    dialog = controller.dialog
    wizard = controller.wizard
    planned = wizard.request()
    assert planned.n_cpu_moe > 0 and planned.n_gpu_layers == -1
    assert dialog.experts.isVisibleTo(dialog) and dialog.experts.value() == planned.n_cpu_moe
    # Every layer's experts in RAM: expert_offload, as llama-server's --cpu-moe.
    dialog.experts.setValue(wizard.n_layer)
    request = wizard.request()
    assert request.expert_offload and request.n_cpu_moe == 0
    gpu_bar = controller.wizard.view().bars[0]
    assert gpu_bar.weights < bar_figures(controller)["CPU"]["weights"]
    dialog.flash_attn.setCurrentText("off")
    dialog.type_v.setCurrentText("q8_0")
    assert "needs flash attention" in dialog.problems.text()


def test_dragging_a_budget_slider_redraws_the_bar_each_step(
    qtbot: QtBot, models: dict[str, Path], wizard_on: Any
) -> None:
    """Responsiveness: every slider step redraws (figures and paint); the time is reported."""
    controller = wizard_on("gpu-8gb", models["gpu-8gb"])
    dialog = controller.dialog
    slider = dialog.budget_rows[0].slider
    app = QApplication.instance()
    assert app is not None
    times = []
    seen = set()
    for mib in range(slider.maximum(), 2048, -128):
        start = time.perf_counter()
        slider.setValue(mib)
        app.processEvents()  # the repaint, as the event loop would do it
        times.append(time.perf_counter() - start)
        figures = bar_figures(controller)["CUDA0"]
        assert figures["budget"] == mib << 20
        seen.add(figures["total"])
    assert len(seen) > 5  # the GPU's share moved with the budget (experts go to RAM)
    times.sort()
    print(
        f"\nslider redraw over {len(times)} steps: median {times[len(times) // 2] * 1000:.1f} ms, "
        f"worst {times[-1] * 1000:.1f} ms"
    )
    # The recommendation waits for the slider to rest; a window deleted meanwhile is
    # forgotten, and the pending redraw draws nothing (an exception would fail the test).
    slider.setValue(4096)
    dialog.deleteLater()
    qtbot.waitUntil(lambda: controller.dialog is None, timeout=5_000)
    qtbot.wait(400)


def test_gui_hardware_flag_plans_fit_badges_for_the_described_machine(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.services.models.fit import planner_wiring
    from engine.gguf.header import read_gguf_header

    model = models["gpu-24gb"]
    header = read_gguf_header(model)
    for name, level in (("gpu-24gb", "gpu"), ("cpu-16gb", "cpu"), ("gpu-8gb", "gpu")):
        fit, _pick, _reader = planner_wiring(HardwareSource(MACHINES[name], file=name))
        assert fit(model.name, header, model.stat().st_size).level == level, name
    # A bad file is one line and exit 1, before any window opens.
    assert peregrine(["gui", "--hardware", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hardware file not found" in err


# --- this machine, with the real engine -------------------------------------------------


@pytest.mark.slow
def test_this_machine_is_measured_and_apply_loads_through_the_engine(
    qtbot: QtBot, default_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    window = make_window(qtbot, default_model)
    with qtbot.waitSignal(window.supervisor.ready, timeout=180_000):
        window.start_engine()
    qtbot.waitUntil(lambda: bool(window.models.entries), timeout=60_000)

    # "Load with settings…" in the library opens it for the selected model.
    window.show_page(Page.MODELS)
    library = window.models_view.library
    assert library.select(default_model)
    extra = [b for b, _a in library._extra if b.text() == "Load with settings…"]
    assert len(extra) == 1
    wizard = window.wizard
    with qtbot.waitSignal(wizard.measured, timeout=120_000):
        extra[0].click()
    dialog = wizard.dialog
    assert dialog is not None and wizard.model == default_model
    qtbot.waitUntil(lambda: "Measured" in dialog.method.text(), timeout=10_000)
    assert "dry run" in dialog.method.text()
    # The measured bars are profile's measured figures for the same inputs.
    capsys.readouterr()
    assert peregrine(["profile", "--json", "--model", str(default_model)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "measured"
    assert_bars_equal_profile(wizard, data)
    hardware = dialog.hardware.text()
    assert "GPU: none found" in hardware or "GPU CUDA0" in hardware
    assert "RAM:" in hardware and "Runtime: built-in llama.cpp" in dialog.runtime.text()

    # A change goes back to estimated until its own dry run is done.
    dialog.ctx.setValue(2048)
    dialog.type_k.setCurrentText("q8_0")
    assert "Estimated" in dialog.method.text()
    with qtbot.waitSignal(wizard.measured, timeout=120_000):
        pass
    qtbot.waitUntil(lambda: "Measured" in dialog.method.text(), timeout=10_000)

    # Apply loads through /v1/engine/load with progress; the engine then runs exactly that.
    sent = wizard.wizard.request()
    with qtbot.waitSignal(window.engine.load_finished, timeout=180_000):
        dialog.apply_button.click()
        assert not dialog.progress.isHidden()
    qtbot.waitUntil(lambda: not dialog.isVisible(), timeout=5_000)
    assert wizard.sent == [sent]
    endpoint = window.engine.endpoint()
    assert endpoint is not None
    with EngineClient(endpoint) as client:
        status = client.engine_status()
    assert status is not None and status.settings is not None
    assert status.settings.model_dump() == sent.model_dump()
    # Remembered for the next start, with the placement fields.
    saved = SettingsStore(Paths.from_env().settings_file).load()
    remembered = saved.load_settings(str(default_model))
    assert (remembered.n_ctx, remembered.type_k) == (2048, "q8_0")

    # Settings → Engine has the wizard's door too; the first run marks it shown.
    window.show_page(Page.SETTINGS)
    assert not saved.wizard_shown
    window.open_wizard(first_run=True)
    assert dialog.heading.text() == "Welcome to Peregrine"
    assert window.settings.settings.wizard_shown
    dialog.close()
