"""The wizard's Qt-free service and the paths its settings take to the engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.services.engine.control import load_request, load_settings_of
from app.services.engine.launch import launch_spec, serve_command
from app.services.models.fit import HardwareSource
from app.services.models.wizard import MIN_RAM_BUDGET, LoadWizard, hardware_lines
from app.services.settings import EngineSettings
from engine.planning.probe import MeasuredMemory
from engine.serving.serve_cli import _load_request, build_parser
from tests.planner_models import qwen3moe_like
from tests.test_gui_wizard import MACHINES

GiB = 1 << 30


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen3moe_like(tmp_path_factory.mktemp("moe"))


def test_the_wizards_request_survives_settings_restart_and_the_serve_command_line(
    moe: Path,
) -> None:
    """Apply remembers the load; the next start's `peregrine serve` flags rebuild it exactly."""
    wizard = LoadWizard.open(moe, MACHINES["two-gpus"], described=True)
    wizard.set_choices(n_gpu_layers=40, n_cpu_moe=7, tensor_split=(1.0, 2.0), n_ctx=16384)
    request = wizard.request()
    assert (request.n_cpu_moe, request.tensor_split, request.n_gpu_layers) == (7, [1.0, 2.0], 40)
    remembered = load_settings_of(request)
    # Through /v1/engine/load (a switch) ...
    assert load_request(moe, remembered, EngineSettings()) == request
    # ... and through the command line (a fresh start, a crash restart).
    spec = launch_spec(moe, remembered, EngineSettings(), None)
    argv = serve_command(spec, parent_pid=1)
    args = build_parser().parse_args(argv[argv.index("serve") + 1 :])
    assert _load_request(args, str(moe)) == request
    # Every expert in RAM is llama-server's --cpu-moe.
    wizard.set_choices(n_cpu_moe=wizard.n_layer)
    everything = load_settings_of(wizard.request())
    argv = serve_command(launch_spec(moe, everything, EngineSettings(), None), parent_pid=1)
    assert "--cpu-moe" in argv
    args = build_parser().parse_args(argv[argv.index("serve") + 1 :])
    assert _load_request(args, str(moe)).expert_offload


def test_serve_refuses_a_bad_tensor_split() -> None:
    from engine.errors import UsageError

    for bad in ("a,b", "nan,1", "-1,2", ""):
        args = build_parser().parse_args([f"--tensor-split={bad}"])
        with pytest.raises(UsageError, match="--tensor-split"):
            _load_request(args, "m.gguf")


def test_only_this_machine_is_dry_run_and_measured_figures_replace_the_estimate(
    moe: Path,
) -> None:
    described = LoadWizard.open(moe, MACHINES["gpu-24gb"], described=True)
    assert described.wants_dry_run() is None
    assert described.view().method == "estimated"

    here = LoadWizard.open(moe, MACHINES["cpu-16gb"])  # as if detected here
    here.set_budget(0, 200 * GiB)  # capped at the free memory
    assert here.budgets == [MACHINES["cpu-16gb"].ram.available]
    here.set_budget(0, 0)  # the RAM budget never goes to 0
    assert here.budgets == [MIN_RAM_BUDGET]
    here.set_budget(0, here.default_budget(0))
    load = here.wants_dry_run()
    assert load is not None and load == here.request()
    est = here.view().bars[0]
    measured = MeasuredMemory(
        weights_total=est.weights + 5,
        kv_total=est.kv,
        compute={"CPU": est.compute + 7},
        output={"CPU": 1000},
        n_ctx=load.n_ctx,
    )
    here.set_measured(load, measured)
    view = here.view()
    assert view.method == "measured" and "dry run" in view.method_note
    bar = view.bars[0]
    assert (bar.weights, bar.compute, bar.overhead) == (est.weights + 5, est.compute + 7, 1000)
    assert here.wants_dry_run() is None
    # Other settings are estimated again until their own dry run.
    here.set_choices(n_ctx=2048)
    assert here.view().method == "estimated" and here.wants_dry_run() is not None


def test_a_dry_run_that_cannot_see_the_planned_gpus_keeps_the_estimate(moe: Path) -> None:
    wizard = LoadWizard.open(moe, MACHINES["gpu-8gb"])  # "this machine" has a GPU here
    load = wizard.wants_dry_run()
    assert load is not None and load.n_gpu_layers != 0
    wizard.set_measured(load, MeasuredMemory(weights_total=1, n_ctx=load.n_ctx))
    view = wizard.view()
    assert view.method == "estimated" and "does not see the planned GPUs" in view.method_note


def test_hardware_lines_say_what_could_not_be_probed_and_why() -> None:
    hw = replace(MACHINES["cpu-16gb"], missing=["NVML: libnvidia-ml.so.1 not found"])
    lines = hardware_lines(hw)
    assert lines[0] == "GPU: none found"
    assert lines[-1] == "Not probed: NVML: libnvidia-ml.so.1 not found"
    source = HardwareSource(detect=lambda: hw)
    assert not source.described and source.get() is source.get()
