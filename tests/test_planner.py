"""The planner on synthetic machines x real-model-shaped fixtures, and on the real default model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from engine.errors import PeregrineError
from engine.planning.hardware import CPU, GPU, RAM, Hardware, Runtime, detect_hardware
from engine.planning.planner import (
    STAGES,
    ModelCandidate,
    Pins,
    Plan,
    device_budgets,
    device_names,
    fit_badge,
    plan,
    plan_for_file,
)
from engine.planning.probe import MeasuredMemory
from engine.wire.control import LoadRequest
from tests.planner_models import (
    candidate,
    gemma3_like,
    llama8b_like,
    quant_family,
    qwen3moe_like,
)

GiB = 1 << 30
ALL_QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


def machine(
    gpus: list[tuple[str, float]], ram_gib: float, runtimes: list[Runtime] | None = None
) -> Hardware:
    """A synthetic machine: GPUs as (name, GiB) with a little already in use, RAM mostly free."""
    return Hardware(
        gpus=[
            GPU(name, "cuda", int(gib * GiB), int((gib - 0.4) * GiB), "8.6") for name, gib in gpus
        ],
        cpu=CPU("Test CPU", 8, 16, ["avx2"]),
        ram=RAM(int(ram_gib * GiB), int(ram_gib * 0.8 * GiB)),
        disk_free=500 * GiB,
        runtimes=runtimes or [],
    )


MACHINES: dict[str, Hardware] = {
    "laptop-8gb": machine([], 8),
    "rtx3070-8gb": machine([("NVIDIA GeForce RTX 3070", 8)], 32),
    "rtx3090-24gb": machine([("NVIDIA GeForce RTX 3090", 24)], 64),
    "h100-80gb": machine([("NVIDIA H100 80GB HBM3", 80)], 256),
    "3090+3060": machine([("NVIDIA GeForce RTX 3090", 24), ("NVIDIA GeForce RTX 3060", 12)], 64),
}

FAMILIES: dict[str, Callable[[Path, str], Path]] = {
    "llama8b": llama8b_like,
    "qwen3moe": qwen3moe_like,
    "gemma3": gemma3_like,
}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[ModelCandidate]]:
    folder = tmp_path_factory.mktemp("planner_models")
    return {name: quant_family(folder, build, ALL_QUANTS) for name, build in FAMILIES.items()}


def assert_within_budget(p: Plan, hw: Hardware, pins: Pins | None = None) -> None:
    pins = pins or Pins()
    gpu_budgets, ram_budget = device_budgets(hw, pins)
    budgets = dict(zip(device_names(hw.gpus), gpu_budgets, strict=True))
    budgets["CPU"] = ram_budget + p.paged_bytes
    for d in p.memory.devices:
        assert d.total <= budgets[d.name], (d.name, d.total, budgets[d.name])
    if pins.total_budget_bytes is not None:
        assert p.memory.total <= pins.total_budget_bytes
    assert p.memory.total == sum(d.total for d in p.memory.devices)


@pytest.mark.parametrize("machine_name", list(MACHINES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plans_stay_within_budget_on_every_machine(
    families: dict[str, list[ModelCandidate]], machine_name: str, family: str
) -> None:
    hw = MACHINES[machine_name]
    try:
        p = plan(hw, families[family])
    except PeregrineError as exc:
        # Only the 30B MoE may be too big, and only for the 8 GB laptop.
        assert (family, machine_name) == ("qwen3moe", "laptop-8gb")
        assert "does not fit" in str(exc)
        return
    assert_within_budget(p, hw)
    LoadRequest.model_validate(p.load.model_dump())
    if not hw.gpus:
        assert p.load.n_gpu_layers == 0
        assert p.load.tensor_split is None
    assert p.reasons and p.method == "estimated"
    assert p.quant_file in {c.file_name for c in families[family]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_more_gpu_memory_never_moves_the_plan_backwards(
    families: dict[str, list[ModelCandidate]], family: str
) -> None:
    """From no GPU, through tiny ones that hold no layer, up to 80 GB (issue 19's defect)."""
    no_gpu = plan(machine([], 64), families[family])
    previous = no_gpu
    for gib in (0.5, 1, 1.5, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80):
        hw = machine([("GPU", gib)], 64)
        p = plan(hw, families[family])
        assert_within_budget(p, hw)
        assert p.objective >= previous.objective, (gib, p.reasons)
        if p.objective[:4] == previous.objective[:4]:  # the same tier: context first
            assert p.load.n_ctx >= previous.load.n_ctx, gib
        if p.load.n_gpu_layers == 0:  # a GPU that holds no layer: exactly the CPU plan
            assert p.load == no_gpu.load and p.stage == no_gpu.stage, gib
        previous = p


@pytest.mark.parametrize("family", ["llama8b", "gemma3"])
def test_more_ram_never_moves_a_cpu_plan_backwards(
    families: dict[str, list[ModelCandidate]], family: str
) -> None:
    previous = len(STAGES)
    for gib in (8, 12, 16, 24, 32, 64, 128):
        p = plan(machine([], gib), families[family])
        assert p.load.n_gpu_layers == 0
        assert p.stage <= previous
        previous = p.stage


def test_h100_runs_the_best_quant_at_full_context(
    families: dict[str, list[ModelCandidate]],
) -> None:
    p = plan(MACHINES["h100-80gb"], families["llama8b"])
    assert p.stage == 0
    assert p.quant_file is not None and "Q8_0" in p.quant_file
    assert (p.load.n_ctx, p.load.type_k, p.load.type_v, p.load.n_gpu_layers) == (
        131072,
        "f16",
        "f16",
        -1,
    )


def test_rtx3090_gives_up_kv_precision_first(families: dict[str, list[ModelCandidate]]) -> None:
    p = plan(MACHINES["rtx3090-24gb"], families["llama8b"])
    assert p.stage == 1
    assert (p.load.type_k, p.load.type_v, p.load.n_ctx) == ("q8_0", "q8_0", 131072)
    assert any("near-lossless" in r for r in p.reasons)


def test_rtx3070_keeps_full_offload_with_a_shorter_context(
    families: dict[str, list[ModelCandidate]],
) -> None:
    p = plan(MACHINES["rtx3070-8gb"], families["llama8b"])
    assert p.quant_file is not None and "Q4_K_M" in p.quant_file
    assert p.load.n_gpu_layers == -1
    assert 8192 <= p.load.n_ctx < 131072
    assert p.stage == STAGES.index("shorter context")
    assert any(r.startswith("context") and "instead of 131072" in r for r in p.reasons)


def test_moe_on_an_8gb_card_keeps_some_experts_in_ram(
    families: dict[str, list[ModelCandidate]],
) -> None:
    """Issue 'Planner II' defect 4: per layer, not all or nothing; the GPU is used to the full."""
    p = plan(MACHINES["rtx3070-8gb"], families["qwen3moe"])
    assert p.load.expert_offload is False
    assert 0 < p.load.n_cpu_moe < 48
    assert p.load.n_gpu_layers == -1
    assert p.load.n_ctx == 40960  # the full trained context: experts make room, not context
    assert p.stage == STAGES.index("partial offload")
    assert any(f"--n-cpu-moe {p.load.n_cpu_moe}" in r for r in p.reasons)
    cuda = p.memory.device("CUDA0")
    budget = 7.6 * GiB - Pins().headroom_bytes
    assert cuda is not None and budget - 0.5 * GiB < cuda.total <= budget  # no idle GiB


def test_dense_model_too_big_for_the_card_is_partially_offloaded(
    families: dict[str, list[ModelCandidate]],
) -> None:
    only_floor = [c for c in families["gemma3"] if "Q4_K_M" in c.file_name]
    p = plan(machine([("small", 6)], 32), only_floor)
    assert 0 < p.load.n_gpu_layers <= 48
    assert p.load.expert_offload is False
    assert any(r.startswith("partial offload") for r in p.reasons)


def test_two_unequal_gpus_split_by_free_memory(families: dict[str, list[ModelCandidate]]) -> None:
    hw = MACHINES["3090+3060"]
    p = plan(hw, families["llama8b"])
    assert p.stage == 0  # split beats giving up KV precision on the 3090 alone
    split = p.load.tensor_split
    # Layer counts per GPU (the output head counts as one), as llama.cpp's --fit writes them.
    assert split is not None and len(split) == 2 and min(split) > 0
    assert sum(split) == 33
    assert_within_budget(p, hw)
    assert any(r.startswith("layers split across GPUs") for r in p.reasons)


def test_one_gpu_is_used_alone_when_it_is_enough(families: dict[str, list[ModelCandidate]]) -> None:
    q4 = [c for c in families["llama8b"] if "Q4_K_M" in c.file_name]
    p = plan(MACHINES["3090+3060"], q4)
    assert p.stage == 0
    assert p.load.tensor_split == [33.0, 0.0]
    assert any("is enough: no split" in r for r in p.reasons)


def test_a_split_wins_when_it_keeps_more_context(families: dict[str, list[ModelCandidate]]) -> None:
    hw = MACHINES["3090+3060"]
    alone = plan(replace(hw, gpus=hw.gpus[:1]), families["gemma3"])
    both = plan(hw, families["gemma3"])
    assert both.stage == alone.stage == STAGES.index("shorter context")
    assert both.load.n_ctx > alone.load.n_ctx
    assert both.load.tensor_split is not None and min(both.load.tensor_split) > 0
    assert_within_budget(both, hw)


def test_cpu_only_laptop(families: dict[str, list[ModelCandidate]]) -> None:
    p = plan(MACHINES["laptop-8gb"], families["llama8b"])
    assert p.load.n_gpu_layers == 0
    assert p.load.threads == 8
    assert "CPU only: zero GPU layers" in p.reasons


def test_below_floor_quants_come_last(families: dict[str, list[ModelCandidate]]) -> None:
    p = plan(MACHINES["laptop-8gb"], families["gemma3"])
    assert p.stage == STAGES.index("quant below the floor")
    assert p.quant_file is not None and ("Q3_K_M" in p.quant_file or "Q2_K" in p.quant_file)
    assert any("below the ~4.5 bpw quality floor" in r for r in p.reasons)


def test_nothing_fits_is_a_clear_error(families: dict[str, list[ModelCandidate]]) -> None:
    with pytest.raises(PeregrineError, match=r"does not fit: even Q2_K with 8192 tokens") as info:
        plan(MACHINES["laptop-8gb"], families["qwen3moe"])
    assert "\n" not in str(info.value)


def test_pins_are_respected(families: dict[str, list[ModelCandidate]]) -> None:
    hw = MACHINES["rtx3090-24gb"]
    pins = Pins(ctx=32768, type_k="q8_0", type_v="q8_0", n_gpu_layers=20, threads=3)
    p = plan(hw, families["llama8b"], pins)
    assert (p.load.n_ctx, p.load.type_k, p.load.type_v) == (32768, "q8_0", "q8_0")
    assert (p.load.n_gpu_layers, p.load.threads) == (20, 3)
    assert_within_budget(p, hw, pins)


def test_budget_caps_the_total(families: dict[str, list[ModelCandidate]]) -> None:
    hw = MACHINES["h100-80gb"]
    pins = Pins(total_budget_bytes=12 * GiB)
    p = plan(hw, families["llama8b"], pins)
    assert_within_budget(p, hw, pins)
    assert p.stage > 0


def test_quantized_v_needs_flash_attention() -> None:
    with pytest.raises(PeregrineError, match=r"quantized V cache .* needs flash attention"):
        plan(MACHINES["laptop-8gb"], [], Pins(flash_attn="off", type_v="q8_0"))


def test_without_flash_attention_only_k_is_quantized(
    families: dict[str, list[ModelCandidate]],
) -> None:
    p = plan(MACHINES["rtx3090-24gb"], families["llama8b"], Pins(flash_attn="off"))
    assert p.load.flash_attn == "off"
    assert p.load.type_v == "f16"
    assert p.load.type_k in ("q8_0", "q4_0")


def test_asymmetric_kv_is_flagged_unless_the_runtime_has_the_kernels(
    families: dict[str, list[ModelCandidate]],
) -> None:
    pins = Pins(type_k="q8_0", type_v="f16")
    plain = plan(MACHINES["rtx3090-24gb"], families["llama8b"], pins)
    assert any(r.startswith("warning: K q8_0 / V f16") for r in plain.reasons)
    rt = Runtime(
        "cuda12-fa-all", "cuda", fa_type_pairs=[["q8_0", "f16"]], llama_cpp_commit="0c1e570"
    )
    hw = replace(MACHINES["rtx3090-24gb"], runtimes=[rt])
    p = plan(hw, families["llama8b"], pins)
    assert p.load.runtime == "cuda12-fa-all"
    assert not any(r.startswith("warning") for r in p.reasons)


CPU_RT = Runtime("cpu", "cpu", cpu_variants=["x64", "haswell"])
CUDA_RT = Runtime("cuda12", "cuda", fa_type_pairs=[["f16", "f16"], ["q8_0", "q8_0"]])
VULKAN_RT = Runtime("vulkan", "vulkan")


@pytest.mark.parametrize(
    ("machine_name", "runtimes", "pins", "expected"),
    [
        ("laptop-8gb", [CPU_RT], Pins(), "cpu"),  # CPU-only machines get one too
        ("laptop-8gb", [CUDA_RT], Pins(), None),  # no cpu runtime: the built-in llama.cpp
        ("rtx3090-24gb", [CPU_RT, CUDA_RT], Pins(), "cuda12"),
        ("rtx3090-24gb", [CPU_RT, VULKAN_RT], Pins(), "vulkan"),  # no CUDA one: Vulkan drives it
        ("rtx3090-24gb", [CPU_RT, CUDA_RT], Pins(n_gpu_layers=0), "cpu"),
        ("rtx3090-24gb", [CPU_RT, CUDA_RT], Pins(runtime="cpu"), "cpu"),
    ],
)
def test_the_planner_picks_a_runtime_for_the_devices_it_uses(
    families: dict[str, list[ModelCandidate]],
    machine_name: str,
    runtimes: list[Runtime],
    pins: Pins,
    expected: str | None,
) -> None:
    hw = replace(MACHINES[machine_name], runtimes=runtimes)
    p = plan(hw, families["llama8b"][3:], pins)
    assert p.load.runtime == expected
    if expected is not None:
        backend = next(r.backend for r in runtimes if r.name == expected)
        assert f"runtime {expected} ({backend})" in p.reasons


def test_a_kv_pair_the_runtime_did_not_compile_is_flagged(
    families: dict[str, list[ModelCandidate]],
) -> None:
    hw = replace(MACHINES["rtx3090-24gb"], runtimes=[CUDA_RT])
    listed = plan(hw, families["llama8b"], Pins(type_k="q8_0", type_v="q8_0"))
    assert not any(r.startswith("warning") for r in listed.reasons)
    missing = plan(hw, families["llama8b"], Pins(type_k="q4_0", type_v="q4_0"))
    assert any(r.startswith("warning: K q4_0 / V q4_0") for r in missing.reasons)


def test_fit_badges(families: dict[str, list[ModelCandidate]]) -> None:
    llama_q4 = next(c for c in families["llama8b"] if "Q4_K_M" in c.file_name)
    qwen_q4 = next(c for c in families["qwen3moe"] if "Q4_K_M" in c.file_name)
    assert fit_badge(MACHINES["h100-80gb"], llama_q4).level == "gpu"
    assert fit_badge(MACHINES["rtx3070-8gb"], qwen_q4).level == "partial"
    assert fit_badge(MACHINES["laptop-8gb"], llama_q4).level == "cpu"
    badge = fit_badge(MACHINES["laptop-8gb"], qwen_q4)
    assert badge.level == "no" and badge.total_bytes > 8 * GiB and "does not fit" in badge.summary


def test_default_model_on_this_machine(default_model: Path) -> None:
    hw = detect_hardware()
    cpu_only = replace(hw, gpus=[])
    p = plan(cpu_only, [candidate(default_model)])
    load = p.load
    assert (load.n_ctx, load.type_k, load.type_v, load.flash_attn) == (8192, "f16", "f16", "on")
    assert load.n_gpu_layers == 0
    assert load.threads == hw.cpu.physical_cores
    assert p.stage == 0
    # A machine with more cores than a LoadRequest takes is planned, not refused.
    huge = replace(cpu_only, cpu=replace(hw.cpu, physical_cores=5000, logical_cores=10000))
    assert plan(huge, [candidate(default_model)]).load.threads == 1024


def test_plan_for_file_is_checked_by_a_real_dry_run(default_model: Path) -> None:
    hw = replace(detect_hardware(), gpus=[])
    p = plan_for_file(default_model, hardware=hw)
    assert p.method == "measured"
    assert p.load.model == str(default_model)
    cpu = p.memory.device("CPU")
    assert cpu is not None
    assert p.memory.weights == cpu.weights == 96_576_768
    assert p.memory.kv == 180 * (1 << 20)  # llama.cpp's own figure
    assert "measured by a llama.cpp dry run" in p.reasons[-1]


def test_a_dry_run_over_budget_makes_the_planner_give_more_up(default_model: Path) -> None:
    """When llama.cpp needs more than estimated, the plan is redone with the shortfall."""
    # 320 MiB after headroom: f16 KV (~370 MiB) does not fit, q8_0 (~286 MiB) does on paper.
    hw = replace(machine([], 8), ram=RAM(8 * GiB, GiB + 320 * (1 << 20)))
    calls: list[LoadRequest] = []

    def pessimistic(load: LoadRequest) -> MeasuredMemory:
        calls.append(load)
        # Pretend llama.cpp needs 40 MiB more compute than the estimate says.
        from engine.gguf.header import read_gguf_header
        from engine.planning.estimate import estimate, shape_from_header

        shape = shape_from_header(read_gguf_header(default_model))
        est = estimate(shape, n_ctx=load.n_ctx, type_k=load.type_k, type_v=load.type_v)
        return MeasuredMemory(
            weights_total=est.weights,
            kv_total=est.kv,
            compute={"CPU": est.compute + 40 * (1 << 20)},
            output={"CPU": 1},
            layer_devices=["CPU"] * 31,
            n_ctx=load.n_ctx,
        )

    p = plan_for_file(default_model, hardware=hw, measure_fn=pessimistic)
    assert len(calls) >= 2
    assert p.method == "measured"
    assert (calls[0].type_k, p.load.type_k) == ("q8_0", "q4_0")
    assert any(r.startswith("re-planned after the dry run") for r in p.reasons)
    assert p.memory.total <= hw.ram.available - Pins().headroom_bytes


def test_plan_json_has_the_contract_shape(families: dict[str, list[ModelCandidate]]) -> None:
    p = plan(MACHINES["3090+3060"], families["llama8b"])
    data = p.to_json()
    assert set(data) == {"hardware", "plan", "memory", "method"}
    assert set(data["plan"]) == {"load", "quant_file", "reasons"}
    assert set(data["memory"]) == {"weights", "kv", "compute", "overhead", "total", "devices"}
    assert {d["name"] for d in data["memory"]["devices"]} == {"CPU", "CUDA0", "CUDA1"}
    for d in data["memory"]["devices"]:
        assert set(d) == {"name", "weights", "kv", "compute", "total", "free"}
    assert Hardware.from_json(data["hardware"]) == MACHINES["3090+3060"]


def test_a_draft_model_is_counted_where_the_engine_loads_it(
    families: dict[str, list[ModelCandidate]],
) -> None:
    from engine.planning.estimate import estimate, shape_from_header
    from engine.serving.scheduler import _draft_placement

    draft = shape_from_header(families["llama8b"][-1].header)  # a big draft: Q2_K of 8B
    hw = MACHINES["rtx3090-24gb"]
    pins = Pins(ctx=8192, type_k="q8_0", type_v="q8_0")
    alone = plan(hw, families["llama8b"], pins)
    paired = plan(hw, families["llama8b"], replace(pins, draft=draft))
    expected = estimate(draft, n_ctx=8192, type_k="q8_0", type_v="q8_0").total
    if paired.quant_file == alone.quant_file and paired.load == alone.load:
        assert paired.memory.total - alone.memory.total == expected
        # Fully offloaded: the draft sits on the GPU with the output head, not the host.
        growth = {
            d.name: d.total - a.total
            for d, a in zip(paired.memory.devices, alone.memory.devices, strict=True)
        }
        assert growth == {"CPU": 0, "CUDA0": expected}
    # The engine loads it there: all its layers on GPUs, and only on the last one used.
    assert _draft_placement(paired.load)[0] == -1
    assert_within_budget(paired, hw, replace(pins, draft=draft))
    # Split over two GPUs, the draft goes whole to the one holding the output head.
    two = MACHINES["3090+3060"]
    gib = 1 << 30
    tight = replace(pins, draft=draft, budget_bytes=[8 * gib, 10 * gib, 48 * gib])
    split_plan = plan(two, families["llama8b"], tight)
    assert_within_budget(split_plan, two, tight)
    used = split_plan.load.tensor_split
    assert used is not None and sum(f > 0 for f in used) == 2
    assert _draft_placement(split_plan.load) == (-1, [0.0, 1.0])
    # Nothing offloaded: the draft stays on the host, as the planner counts it.
    assert _draft_placement(split_plan.load.model_copy(update={"n_gpu_layers": 0})) == (0, None)
    # On a machine where the model alone just fits, the draft takes room from it.
    laptop = machine([], 16)
    cpu_alone = plan(laptop, families["llama8b"])
    cpu_paired = plan(laptop, families["llama8b"], Pins(draft=draft))
    assert_within_budget(cpu_paired, laptop, Pins(draft=draft))
    assert (cpu_paired.stage, -cpu_paired.load.n_ctx) > (
        cpu_alone.stage,
        -cpu_alone.load.n_ctx,
    ) or (cpu_paired.quant_file != cpu_alone.quant_file)
