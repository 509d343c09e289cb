"""Memory planner: the quant, context, KV cache and offload that fit this machine, with reasons.

`plan()` is pure: hardware + candidate files + pinned choices in, a `Plan` out.
It gives things up in a fixed order as memory tightens (issue 5, docs/planner.md):

0. nothing: the best quant, f16 KV, the trained context, every layer on the GPU;
1. KV f16 -> q8_0 (near-lossless with llama.cpp's Hadamard rotation);
2. a smaller weight quant, keeping full offload, down to the ~4.5 bpw floor;
3. context down to `min_ctx`;
4. KV q8_0 -> q4_0;
5. partial offload (MoE: expert tensors to system RAM first);
6. quants below the floor.

`plan_for_file()` adds the dry run (engine/planning/probe.py) for local files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from engine.errors import PeregrineError
from engine.gguf.header import GGUFHeader, validate_gguf_file
from engine.planning.estimate import (
    CTX_PAD,
    DEVICE_PREFIX,
    GIB,
    Device,
    DeviceMemory,
    MemoryBreakdown,
    ModelShape,
    estimate,
    shape_from_header,
)
from engine.planning.hardware import GPU, Hardware, Runtime, detect_hardware
from engine.planning.probe import MeasuredMemory, measure
from engine.wire.base import KV_BYTES_PER_ELEMENT, MAX_N_CTX, FlashAttn, KVType
from engine.wire.control import LoadRequest

log = logging.getLogger(__name__)

DEFAULT_MIN_CTX = 8192
DEFAULT_HEADROOM = 1 * GIB
QUALITY_FLOOR_BPW = 4.5  # about Q4_K_M
# Above this, more bits buy nothing visible: F16/BF16 rank with Q8_0, and the smaller file wins.
QUALITY_CAP_BPW = 8.5

FULL_PRECISION_KV = ("f16", "bf16", "f32")

# The give-up order, as `Plan.stage` indexes it.
STAGES = (
    "best settings",
    "KV cache q8_0",
    "smaller quant",
    "shorter context",
    "KV cache q4_0",
    "partial offload",
    "quant below the floor",
)

Method = Literal["measured", "estimated"]
FitLevel = Literal["gpu", "partial", "cpu", "no"]


@dataclass
class Pins:
    """Choices the user fixed; None means the planner decides."""

    ctx: int | None = None
    min_ctx: int = DEFAULT_MIN_CTX
    type_k: KVType | None = None
    type_v: KVType | None = None
    budget_bytes: int | None = None  # cap on the plan's total, all devices together
    headroom_bytes: int = DEFAULT_HEADROOM  # left free on every device
    flash_attn: FlashAttn | None = None
    n_gpu_layers: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int | None = None
    runtime: str | None = None


@dataclass(frozen=True)
class ModelCandidate:
    """One quant file of a model: local (path) or remote (header read by Range requests)."""

    file_name: str
    header: GGUFHeader
    file_size: int
    path: str | None = None

    @property
    def bits_per_weight(self) -> float:
        n = self.header.n_params
        return self.header.tensor_bytes * 8 / n if n else 0.0

    @property
    def quant(self) -> str:
        return self.header.quant_name or "?"


@dataclass
class Plan:
    """The planner's answer: what to load, why, and what it will take."""

    load: LoadRequest
    quant_file: str | None
    reasons: list[str]
    memory: MemoryBreakdown
    method: Method
    stage: int = 0  # index into STAGES: how far down the give-up order this plan went
    hardware: Hardware | None = None

    def to_json(self, hardware: Hardware | None = None) -> dict[str, Any]:
        """docs/api.md's `peregrine profile --json` object."""
        hw = hardware or self.hardware
        return {
            "hardware": hw.to_json() if hw is not None else None,
            "plan": {
                "load": self.load.model_dump(),
                "quant_file": self.quant_file,
                "reasons": list(self.reasons),
            },
            "memory": self.memory.to_json(),
            "method": self.method,
        }


@dataclass(frozen=True)
class FitBadge:
    """How one quant file fits this machine, for the model manager's list."""

    level: FitLevel
    total_bytes: int
    summary: str


@dataclass(frozen=True)
class _Config:
    cand: ModelCandidate
    type_k: str
    type_v: str
    n_ctx: int
    n_gpu_layers: int  # -1 all, 0 none
    split: tuple[float, ...] | None  # over all GPUs; None when there are none
    expert_offload: bool


@dataclass
class _Context:
    """Everything fixed for one planning run."""

    hardware: Hardware
    pins: Pins
    shapes: dict[str, ModelShape]
    gpus: list[Device]
    gpu_budget: dict[str, int]
    host: Device
    host_budget: int
    cap: int | None
    flash_attn: bool
    runtime: Runtime | None
    device_options: list[tuple[float, ...]] = field(default_factory=list)

    def evaluate(self, c: _Config) -> MemoryBreakdown:
        return estimate(
            self.shapes[c.cand.file_name],
            n_ctx=c.n_ctx,
            type_k=c.type_k,
            type_v=c.type_v,
            flash_attn=self.flash_attn,
            n_gpu_layers=c.n_gpu_layers if self.gpus else 0,
            gpus=self.gpus,
            tensor_split=c.split,
            expert_offload=c.expert_offload,
            n_ubatch=self.pins.n_ubatch,
            host=self.host,
        )

    def fits(self, mem: MemoryBreakdown) -> bool:
        return not self.overshoot(mem)

    def overshoot(self, mem: MemoryBreakdown) -> dict[str, int]:
        """Bytes over budget, per device ("total" for the cap); empty when it fits."""
        over: dict[str, int] = {}
        for d in mem.devices:
            budget = (
                self.host_budget if d.name == self.host.name else self.gpu_budget.get(d.name, 0)
            )
            if d.total > budget:
                over[d.name] = d.total - budget
        if self.cap is not None and mem.total > self.cap:
            over["total"] = mem.total - self.cap
        return over


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def device_names(gpus: Sequence[GPU]) -> list[str]:
    """llama.cpp's names for the GPUs: CUDA0, CUDA1, ROCm0, Vulkan0 ..."""
    counters: dict[str, int] = {}
    names = []
    for g in gpus:
        prefix = DEVICE_PREFIX.get(g.backend, g.backend.upper() or "GPU")
        i = counters.get(prefix, 0)
        counters[prefix] = i + 1
        names.append(f"{prefix}{i}")
    return names


def _check_pins(pins: Pins) -> None:
    for name, value in (("cache-type-k", pins.type_k), ("cache-type-v", pins.type_v)):
        if value is not None and value not in KV_BYTES_PER_ELEMENT:
            raise PeregrineError(
                f"unknown --{name} {value!r}; use one of {', '.join(KV_BYTES_PER_ELEMENT)}"
            )
    if pins.flash_attn == "off" and pins.type_v not in (None, *FULL_PRECISION_KV):
        raise PeregrineError(
            f"a quantized V cache ({pins.type_v}) needs flash attention; use --flash-attn on "
            "or --cache-type-v f16"
        )
    if pins.ctx is not None and pins.ctx < 16:
        raise PeregrineError(f"--ctx must be at least 16, not {pins.ctx}")
    if pins.min_ctx < 16:
        raise PeregrineError(f"--min-ctx must be at least 16, not {pins.min_ctx}")
    if pins.budget_bytes is not None and pins.budget_bytes <= 0:
        raise PeregrineError("the memory budget must be positive")
    if pins.headroom_bytes < 0:
        raise PeregrineError("the headroom cannot be negative")


def _pick_runtime(hardware: Hardware, pins: Pins) -> Runtime | None:
    if pins.runtime:
        found = next((r for r in hardware.runtimes if r.name == pins.runtime), None)
        if found is None:
            raise PeregrineError(f"runtime {pins.runtime!r} is not installed")
        return found
    backends = {g.backend for g in hardware.gpus}
    return next((r for r in hardware.runtimes if r.backend in backends), None)


def plan(
    hardware: Hardware,
    candidates: Sequence[ModelCandidate],
    pins: Pins | None = None,
) -> Plan:
    """Plans a load of the best-fitting candidate; raises PeregrineError when nothing fits."""
    pins = pins or Pins()
    _check_pins(pins)
    if not candidates:
        raise PeregrineError("no model file to plan for")
    shapes = {c.file_name: shape_from_header(c.header) for c in candidates}
    ctx = _make_context(hardware, pins, shapes)
    return _search(ctx, list(candidates))


def _make_context(hardware: Hardware, pins: Pins, shapes: dict[str, ModelShape]) -> _Context:
    use_gpus = pins.n_gpu_layers != 0 and bool(hardware.gpus)
    gpus = (
        [
            Device(name, g.backend, g.free)
            for name, g in zip(device_names(hardware.gpus), hardware.gpus, strict=True)
        ]
        if use_gpus
        else []
    )
    gpu_budget = {d.name: max(0, d.free - pins.headroom_bytes) for d in gpus}
    host = Device("CPU", "cpu", hardware.ram.available)
    runtime = _pick_runtime(hardware, pins) if gpus else None
    ctx = _Context(
        hardware=hardware,
        pins=pins,
        shapes=shapes,
        gpus=gpus,
        gpu_budget=gpu_budget,
        host=host,
        host_budget=max(0, hardware.ram.available - pins.headroom_bytes),
        cap=pins.budget_bytes,
        flash_attn=(pins.flash_attn or "on") != "off",
        runtime=runtime,
    )
    if gpus:
        # One GPU (the roomiest) first: no split overhead; then all of them, by free memory.
        budgets = [gpu_budget[d.name] for d in gpus]
        best = max(range(len(gpus)), key=lambda i: budgets[i])
        ctx.device_options.append(tuple(1.0 if i == best else 0.0 for i in range(len(gpus))))
        if len(gpus) > 1 and sum(budgets) > 0:
            ctx.device_options.append(tuple(round(b / sum(budgets), 4) for b in budgets))
    return ctx


def _kv_pairs(ctx: _Context) -> list[tuple[str, str]]:
    """The KV ladder: f16, q8_0, q4_0 (V stays f16 without flash attention)."""
    p = ctx.pins
    if p.type_k is not None or p.type_v is not None:
        k = p.type_k or p.type_v or "f16"
        v = p.type_v or (p.type_k if ctx.flash_attn else "f16") or "f16"
        return [(k, v)]
    if not ctx.flash_attn:
        return [("f16", "f16"), ("q8_0", "f16"), ("q4_0", "f16")]
    return [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")]


def _quality_key(c: ModelCandidate) -> tuple[float, int]:
    return (-min(c.bits_per_weight, QUALITY_CAP_BPW), c.file_size)


def _search(ctx: _Context, candidates: list[ModelCandidate]) -> Plan:
    pins = ctx.pins
    ordered = sorted(candidates, key=_quality_key)
    above = [c for c in ordered if c.bits_per_weight >= QUALITY_FLOOR_BPW]
    below = [c for c in ordered if c.bits_per_weight < QUALITY_FLOOR_BPW]
    notes: list[str] = []
    if not above:
        above, below = ordered, []
        notes.append(
            f"every file is below the ~{QUALITY_FLOOR_BPW} bpw quality floor; using the best of them"
        )
    shape0 = ctx.shapes[ordered[0].file_name]
    # Capped at what a LoadRequest accepts (4 Mi tokens): a header may claim more.
    trained = min(shape0.n_ctx_train, MAX_N_CTX)
    target = pins.ctx or trained
    min_ctx = pins.ctx or min(pins.min_ctx, trained, target)
    kv = _kv_pairs(ctx)
    kv_best, kv_mid, kv_low = kv[0], kv[min(1, len(kv) - 1)], kv[-1]
    full_ngl = -1 if ctx.gpus else 0
    if pins.n_gpu_layers is not None and pins.n_gpu_layers > 0:
        full_ngl = pins.n_gpu_layers

    def full(cand: ModelCandidate, pair: tuple[str, str], lo: int, hi: int) -> _Config | None:
        """The largest context in [lo, hi] that fits with the fixed placement.

        Device options are tried in order (one GPU, then a split); a later option
        wins only with a longer context, since context is what is being given up.
        """
        splits: list[tuple[float, ...] | None] = list(ctx.device_options) or [None]
        best: _Config | None = None
        for split in splits:
            base = _Config(cand, pair[0], pair[1], hi, full_ngl, split, False)
            found = _max_ctx(ctx, base, lo, hi)
            if found is not None and (best is None or found.n_ctx > best.n_ctx):
                best = found
        return best

    stages: list[Callable[[], _Config | None]] = [
        lambda: full(above[0], kv_best, target, target),
        lambda: full(above[0], kv_mid, target, target) if kv_mid != kv_best else None,
        lambda: next(
            (f for c in above[1:] if (f := full(c, kv_mid, target, target)) is not None), None
        ),
        lambda: full(above[-1], kv_mid, min_ctx, target) if min_ctx < target else None,
        lambda: full(above[-1], kv_low, min_ctx, target) if kv_low != kv_mid else None,
        lambda: _partial(ctx, above[-1], kv_low, min_ctx, target),
        lambda: next(
            (
                f
                for c in below
                if (
                    f := full(c, kv_low, min_ctx, target)
                    or _partial(ctx, c, kv_low, min_ctx, target)
                )
                is not None
            ),
            None,
        ),
    ]
    for stage, attempt in enumerate(stages):
        config = attempt()
        if config is not None:
            return _make_plan(ctx, config, stage, ordered, target, notes)
    raise PeregrineError(_nothing_fits(ctx, ordered[-1], kv_low, min_ctx))


def _partial(
    ctx: _Context, cand: ModelCandidate, pair: tuple[str, str], lo: int, hi: int
) -> _Config | None:
    """Partial offload: MoE experts to RAM first, then fewer layers on the GPUs."""
    pins = ctx.pins
    if not ctx.gpus or (pins.n_gpu_layers is not None and pins.n_gpu_layers != -1):
        return None
    shape = ctx.shapes[cand.file_name]
    for split in ctx.device_options:
        if shape.is_moe:
            found = _max_ctx(ctx, _Config(cand, pair[0], pair[1], hi, -1, split, True), lo, hi)
            if found is not None:
                return found
        for experts in (True, False) if shape.is_moe else (False,):
            base = _Config(cand, pair[0], pair[1], lo, 0, split, experts)
            found = _max_layers(ctx, base, shape.n_layer)
            if found is not None:
                return found
    return None


def _max_ctx(ctx: _Context, base: _Config, lo: int, hi: int) -> _Config | None:
    """Binary search for the largest context in [lo, hi] (steps of 1024) that fits."""
    options = sorted({hi, lo, *range((lo + 1023) // 1024 * 1024, hi, 1024)})
    options = [o for o in options if lo <= o <= hi]
    if not options or not ctx.fits(ctx.evaluate(replace(base, n_ctx=options[0]))):
        return None
    good, bad = 0, len(options)
    while bad - good > 1:
        mid = (good + bad) // 2
        if ctx.fits(ctx.evaluate(replace(base, n_ctx=options[mid]))):
            good = mid
        else:
            bad = mid
    return replace(base, n_ctx=options[good])


def _max_layers(ctx: _Context, base: _Config, n_layer: int) -> _Config | None:
    """Most GPU layers (1..n_layer) that fit; GPU use grows and host use shrinks with them."""

    def gpu_fits(ngl: int) -> bool:
        mem = ctx.evaluate(replace(base, n_gpu_layers=ngl))
        over = ctx.overshoot(mem)
        return not any(name != ctx.host.name and name != "total" for name in over)

    if not gpu_fits(1):
        best = 0
    else:
        good, bad = 1, n_layer + 1
        while bad - good > 1:
            mid = (good + bad) // 2
            if gpu_fits(mid):
                good = mid
            else:
                bad = mid
        best = good
    config = replace(base, n_gpu_layers=best)
    return config if ctx.fits(ctx.evaluate(config)) else None


def _nothing_fits(
    ctx: _Context, smallest: ModelCandidate, pair: tuple[str, str], min_ctx: int
) -> str:
    need = estimate(
        ctx.shapes[smallest.file_name],
        n_ctx=min_ctx,
        type_k=pair[0],
        type_v=pair[1],
        flash_attn=ctx.flash_attn,
        n_ubatch=ctx.pins.n_ubatch,
    ).total
    have = ctx.host_budget + sum(ctx.gpu_budget.values())
    if ctx.cap is not None:
        have = min(have, ctx.cap)
    return (
        f"{smallest.file_name} does not fit: even {smallest.quant} with {min_ctx} tokens of "
        f"context and a {pair[0]} KV cache needs {_gib(need)}, and {_gib(have)} is available "
        f"(free memory minus {_gib(ctx.pins.headroom_bytes)} headroom per device)"
    )


def _make_plan(
    ctx: _Context,
    c: _Config,
    stage: int,
    ordered: list[ModelCandidate],
    target: int,
    notes: list[str],
) -> Plan:
    pins = ctx.pins
    mem = ctx.evaluate(c)
    shape = ctx.shapes[c.cand.file_name]
    best = ordered[0]
    reasons: list[str] = list(notes)
    reasons.append(_describe_budget(ctx))
    if stage == 0:
        reasons.append("everything fits: no compromise needed")
    if c.type_k != "f16" or c.type_v != "f16":
        if pins.type_k or pins.type_v:
            reasons.append(f"KV cache {c.type_k}/{c.type_v}: pinned")
        else:
            reasons.append(
                f"KV cache {c.type_k}/{c.type_v} instead of f16 to save memory "
                "(q8_0 is near-lossless with llama.cpp's Hadamard rotation of K/V)"
            )
    if c.cand.file_name != best.file_name:
        below = (
            c.cand.bits_per_weight < QUALITY_FLOOR_BPW and best.bits_per_weight >= QUALITY_FLOOR_BPW
        )
        reasons.append(
            f"quant {c.cand.quant} ({c.cand.bits_per_weight:.2f} bpw) instead of {best.quant}"
            + (
                f": below the ~{QUALITY_FLOOR_BPW} bpw quality floor, because nothing at or above it fits"
                if below
                else " to keep the whole model in fast memory"
            )
        )
    if c.n_ctx < target:
        reasons.append(
            f"context {c.n_ctx} tokens instead of {target}"
            + (" (the trained context)" if target == shape.n_ctx_train else "")
            + " to fit"
        )
    elif pins.ctx:
        reasons.append(f"context {c.n_ctx} tokens: pinned")
    else:
        reasons.append(f"context {c.n_ctx} tokens: the model's full trained context")
    load_ngl = c.n_gpu_layers
    if ctx.gpus:
        used = [d.name for d, s in zip(ctx.gpus, c.split or (), strict=False) if s > 0]
        if c.expert_offload:
            reasons.append(
                "MoE expert tensors kept in system RAM (the rest on the GPU) so the model fits "
                "with a useful context"
            )
        if 0 < c.n_gpu_layers <= shape.n_layer:
            reasons.append(
                f"partial offload: {c.n_gpu_layers} of {shape.n_layer + 1} layers on the GPU, "
                "the rest on the CPU (slower)"
            )
        elif c.n_gpu_layers == 0:
            reasons.append("no layer fits on the GPU: running on the CPU")
        else:
            reasons.append(f"all layers on {' + '.join(used)}")
        if len(used) > 1:
            reasons.append(
                "layers split across GPUs by free memory: "
                + ", ".join(
                    f"{d.name} {s:.0%}" for d, s in zip(ctx.gpus, c.split or (), strict=False)
                )
            )
        elif len(ctx.gpus) > 1:
            reasons.append(f"one GPU ({used[0]}) is enough: no split")
    else:
        load_ngl = 0
        reasons.append("CPU only: zero GPU layers")
    if ctx.flash_attn:
        reasons.append(
            "flash attention on: smaller compute buffers, and needed for a quantized V cache"
        )
    else:
        reasons.append("flash attention off (pinned): V cache stays f16")
    if (
        ctx.gpus
        and load_ngl != 0
        and c.type_k != c.type_v
        and ctx.flash_attn
        and not (ctx.runtime and ctx.runtime.fa_all_pairs)
    ):
        reasons.append(
            f"warning: K {c.type_k} / V {c.type_v} has no fast flash-attention kernel on this "
            "runtime (asymmetric pairs need a runtime built with GGML_CUDA_FA_QUANTS=all)"
        )
    # LoadRequest takes at most 1024 threads; more cores than that gain nothing here.
    threads = pins.threads or min(ctx.hardware.cpu.physical_cores, 1024)
    reasons.append(
        f"threads = {threads} (physical cores)"
        if not pins.threads
        else f"threads = {threads}: pinned"
    )
    if ctx.runtime is not None:
        reasons.append(f"runtime {ctx.runtime.name} ({ctx.runtime.backend})")
    elif ctx.gpus and load_ngl != 0:
        reasons.append(
            f"no installed runtime for {ctx.gpus[0].backend}: the built-in llama.cpp must have "
            "that backend"
        )
    reasons.extend(shape.notes)
    reasons.append(_describe_fit(ctx, mem))
    split = list(c.split) if c.split is not None and len(c.split) > 1 else None
    load = LoadRequest(
        model=c.cand.path or c.cand.file_name,
        runtime=ctx.runtime.name if ctx.runtime is not None and load_ngl != 0 else None,
        n_ctx=c.n_ctx,
        n_gpu_layers=load_ngl,
        tensor_split=split,
        expert_offload=c.expert_offload,
        type_k=c.type_k,  # type: ignore[arg-type]
        type_v=c.type_v,  # type: ignore[arg-type]
        flash_attn="on" if ctx.flash_attn else "off",
        n_batch=pins.n_batch,
        n_ubatch=pins.n_ubatch,
        threads=threads,
    )
    return Plan(
        load=load,
        quant_file=c.cand.file_name,
        reasons=reasons,
        memory=mem,
        method="estimated",
        stage=stage,
        hardware=ctx.hardware,
    )


def _describe_budget(ctx: _Context) -> str:
    room = f"{_gib(ctx.pins.headroom_bytes)} headroom"
    parts = [f"{d.name} {_gib(ctx.gpu_budget[d.name])}" for d in ctx.gpus]
    parts.append(f"RAM {_gib(ctx.host_budget)}")
    text = "budget: " + ", ".join(parts) + f" (free memory minus {room} each)"
    if ctx.cap is not None:
        text += f", at most {_gib(ctx.cap)} in all"
    return text


def _describe_fit(ctx: _Context, mem: MemoryBreakdown) -> str:
    used = [d for d in mem.devices if d.total > 0]
    return "uses " + ", ".join(
        f"{d.name} {_gib(d.total)} (weights {_gib(d.weights)}, KV {_gib(d.kv)}, compute {_gib(d.compute)})"
        for d in used
    )


def measured_breakdown(estimated: MemoryBreakdown, measured: MeasuredMemory) -> MemoryBreakdown:
    """llama.cpp's own figures, spread over devices the way the estimate spreads them.

    Compute and output buffers are measured per device; weights and KV come as
    totals and are divided in the estimate's proportions. Backend overhead
    (driver contexts) cannot be measured, so the estimate's is kept.
    """

    def share(total: int, part: Callable[[DeviceMemory], int]) -> dict[str, int]:
        est_total = sum(part(d) for d in estimated.devices)
        if est_total <= 0:
            return {d.name: (total if d.name == "CPU" else 0) for d in estimated.devices}
        return {d.name: round(total * part(d) / est_total) for d in estimated.devices}

    weights = share(measured.weights_total, lambda d: d.weights)
    kv = share(measured.kv_total, lambda d: d.kv)
    est_overhead = {d.name: d.total - d.weights - d.kv - d.compute for d in estimated.devices}
    devices = []
    overhead_total = 0
    for d in estimated.devices:
        compute = measured.compute.get(d.name, 0)
        # The host's estimated overhead is its output buffer, which the dry run measures;
        # a GPU's is its backend's fixed cost, which no dry run can see.
        backend = 0 if d.name == "CPU" else est_overhead[d.name]
        overhead = backend + measured.output.get(d.name, 0)
        overhead_total += overhead
        devices.append(
            DeviceMemory(
                name=d.name,
                weights=weights[d.name],
                kv=kv[d.name],
                compute=compute,
                total=weights[d.name] + kv[d.name] + compute + overhead,
                free=d.free,
            )
        )
    return MemoryBreakdown(
        weights=sum(d.weights for d in devices),
        kv=sum(d.kv for d in devices),
        compute=sum(d.compute for d in devices),
        overhead=overhead_total,
        total=sum(d.total for d in devices),
        devices=devices,
    )


MeasureFn = Callable[[LoadRequest], MeasuredMemory]


def plan_for_file(
    path: str | Path,
    hardware: Hardware | None = None,
    pins: Pins | None = None,
    measure: bool = True,
    measure_fn: MeasureFn | None = None,
) -> Plan:
    """Plans a local GGUF; checks the plan with a dry run unless `measure` is False."""
    p = Path(path)
    header = validate_gguf_file(p)
    candidate = ModelCandidate(
        file_name=p.name, header=header, file_size=header.file_size or 0, path=str(p)
    )
    hardware = hardware or detect_hardware()
    pins = pins or Pins()
    result = plan(hardware, [candidate], pins)
    if not measure:
        return result
    return _checked_by_dry_run(result, hardware, candidate, pins, measure_fn or _default_measure)


def _default_measure(load: LoadRequest) -> MeasuredMemory:
    return measure(load)


def _checked_by_dry_run(
    result: Plan,
    hardware: Hardware,
    candidate: ModelCandidate,
    pins: Pins,
    measure_fn: MeasureFn,
) -> Plan:
    """Measures the plan; when llama.cpp needs more than estimated, re-plans with less room."""
    current = result
    adjusted = hardware
    for _ in range(3):
        measured = measure_fn(current.load)
        gpu_layers_used = current.load.n_gpu_layers != 0 and bool(hardware.gpus)
        if gpu_layers_used and len(measured.gpu_devices) < _gpus_used(current):
            current.reasons.insert(
                -1,
                "dry run skipped: the llama.cpp build here does not see the planned GPUs; "
                "figures are estimates",
            )
            return current
        mem = measured_breakdown(current.memory, measured)
        ctx = _make_context(
            hardware, pins, {candidate.file_name: shape_from_header(candidate.header)}
        )
        over = ctx.overshoot(mem)
        if not over:
            current.memory = mem
            current.method = "measured"
            current.reasons[-1] = _describe_fit(ctx, mem) + " (measured by a llama.cpp dry run)"
            return current
        # The estimate was short: take its error off the devices' free memory and re-plan.
        error = {
            d.name: max(0, d.total - e.total)
            for d, e in zip(mem.devices, current.memory.devices, strict=True)
        }
        if "total" in over:
            error["total"] = max(0, mem.total - current.memory.total)
        log.info("dry run exceeds the budget by %s; re-planning", over)
        adjusted = _shrink(adjusted, error, ctx)
        current = plan(adjusted, [candidate], pins)
        current.hardware = hardware
        current.reasons.insert(
            -1,
            "re-planned after the dry run: llama.cpp needs more than estimated ("
            + ", ".join(f"{k} +{v / (1 << 20):.0f} MiB" for k, v in error.items() if v)
            + ")",
        )
    raise PeregrineError("the dry run keeps exceeding the budget; try --ctx or --budget-gib")


def _gpus_used(p: Plan) -> int:
    if p.load.tensor_split:
        return sum(1 for s in p.load.tensor_split if s > 0)
    return 1


def _shrink(hardware: Hardware, over: dict[str, int], ctx: _Context) -> Hardware:
    """The hardware with `over` bytes less free memory per device ("total": on every one)."""
    names = device_names(hardware.gpus)
    gpus = [
        replace(g, free=max(0, g.free - over.get(n, 0) - over.get("total", 0)))
        for n, g in zip(names, hardware.gpus, strict=True)
    ]
    ram = replace(
        hardware.ram,
        available=max(
            0, hardware.ram.available - over.get(ctx.host.name, 0) - over.get("total", 0)
        ),
    )
    return replace(hardware, gpus=gpus, ram=ram)


def fit_badge(hardware: Hardware, candidate: ModelCandidate, pins: Pins | None = None) -> FitBadge:
    """How one quant file fits: all on GPU, partly, CPU only, or not at all."""
    try:
        p = plan(hardware, [candidate], pins)
    except PeregrineError as exc:
        try:
            shape = shape_from_header(candidate.header)
            min_ctx = min((pins or Pins()).min_ctx, shape.n_ctx_train)
            need = estimate(shape, n_ctx=min_ctx, type_k="q4_0", type_v="q4_0").total
        except PeregrineError:
            need = 0  # not a model we can read: the summary says why
        return FitBadge("no", need, str(exc))
    ngl = p.load.n_gpu_layers
    if ngl == 0:
        level: FitLevel = "cpu"
        summary = f"CPU only, {p.load.n_ctx} tokens, {_gib(p.memory.total)}"
    elif ngl == -1 and not p.load.expert_offload:
        level = "gpu"
        summary = f"fits on the GPU, {p.load.n_ctx} tokens, {_gib(p.memory.total)}"
    else:
        level = "partial"
        how = "experts in RAM" if p.load.expert_offload else f"{ngl} layers on the GPU"
        summary = f"partial offload ({how}), {p.load.n_ctx} tokens, {_gib(p.memory.total)}"
    return FitBadge(level, p.memory.total, summary)


__all__ = [
    "CTX_PAD",
    "STAGES",
    "FitBadge",
    "ModelCandidate",
    "Pins",
    "Plan",
    "fit_badge",
    "plan",
    "plan_for_file",
]
