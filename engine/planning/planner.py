"""Memory planner: the quant, context, KV cache and offload that fit this machine, with reasons.

`plan()` is pure: hardware + candidate files + pinned choices in, a `Plan` out.
Of every load that fits the budgets it picks the best by one stated objective
(docs/planner.md), compared in this order:

1. a quant at or above the ~4.5 bpw quality floor;
2. a KV cache of at least q8_0 (q4_0 only to reach `min_ctx`, never beyond it);
3. the offload tier: every layer on the GPUs (MoE experts may stay in system
   RAM) > most of the per-token weight reads on the GPUs, at `min_ctx` > the rest
   (CPU, with whatever layers a small GPU holds at no cost);
4. within a tier: the context (up to the requested or trained context), the fewest
   weight bytes read from system RAM per token, the best quant, the best KV type
   and the fewest GPUs; in the CPU tier the GPU comes last, so it never costs
   context, quant or KV type.

Since more memory on any device only adds loads that fit, the chosen load never
gets worse by this order. When nothing fits, a MoE load whose experts are a
little short of RAM is offered memory-mapped ("weights paged, slower").

`plan_for_file()` adds the dry run (engine/planning/probe.py) for local files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

from engine.errors import PeregrineError
from engine.gguf.header import GGUFHeader, validate_gguf_file
from engine.planning.estimate import (
    BACKEND_OVERHEAD,
    CTX_PAD,
    DEFAULT_BACKEND_OVERHEAD,
    DEVICE_PREFIX,
    GIB,
    MTP_ARCHITECTURES,
    Device,
    DeviceMemory,
    MemoryBreakdown,
    ModelShape,
    compute_bytes,
    estimate,
    kv_layer_bytes,
    layer_layout,
    mtp_compute_bytes,
    shape_from_header,
)
from engine.planning.hardware import GPU, Hardware, Runtime, detect_hardware
from engine.planning.probe import MeasuredMemory, measure
from engine.wire.base import KV_BYTES_PER_ELEMENT, MAX_N_CTX, FlashAttn, KVType
from engine.wire.control import AUTO_PARALLEL, LoadRequest

log = logging.getLogger(__name__)

DEFAULT_MIN_CTX = 8192
DEFAULT_HEADROOM = 1 * GIB
QUALITY_FLOOR_BPW = 4.5  # about Q4_K_M
# Above this, more bits buy nothing visible: F16/BF16 rank with Q8_0, and the smaller file wins.
QUALITY_CAP_BPW = 8.5
# A partial offload is worth shortening the context to min_ctx only when the GPUs
# serve at least this share of the weight bytes read per token (about 1.8x the
# CPU's speed when VRAM reads are ~10x faster than RAM reads).
PARTIAL_OFFLOAD_MIN_SHARE = 0.5
# A memory-mapped (paged) plan may leave at most this share of the experts held
# in RAM to be read from disk; more would make every token wait on the disk.
MAX_PAGED_SHARE = 0.25
# How much faster system RAM reads than an NVMe SSD (about 60 vs 6 GB/s): the
# factor behind a paged plan's "slower" estimate.
RAM_OVER_DISK_SPEED = 10.0
# Every set of GPUs is tried for up to this many GPUs; more are tried each alone and
# all together (the objective's "fewest GPUs" is then not searched exhaustively).
MAX_GPU_SUBSETS = 4

FULL_PRECISION_KV = ("f16", "bf16", "f32")

# What a plan gave up, as `Plan.stage` indexes it (the furthest item given up).
STAGES = (
    "best settings",
    "KV cache q8_0",
    "smaller quant",
    "shorter context",
    "KV cache q4_0",
    "partial offload",
    "quant below the floor",
    "weights paged from disk",
)

Method = Literal["measured", "estimated"]
FitLevel = Literal["gpu", "partial", "cpu", "no"]
Tier = Literal[0, 1, 2]
TIER_CPU, TIER_PARTIAL, TIER_GPU = 0, 1, 2


@dataclass
class Pins:
    """Choices the user fixed; None means the planner decides."""

    ctx: int | None = None
    min_ctx: int = DEFAULT_MIN_CTX
    type_k: KVType | None = None
    type_v: KVType | None = None
    # One budget per device: the GPUs in order, then RAM. Each replaces that device's
    # free memory minus the headroom, and is capped at its free memory.
    budget_bytes: tuple[int, ...] | None = None
    total_budget_bytes: int | None = None  # cap on the plan's total, all devices together
    headroom_bytes: int = DEFAULT_HEADROOM  # left free on every device without a budget
    flash_attn: FlashAttn | None = None
    n_gpu_layers: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int | None = None
    runtime: str | None = None
    # Parallel slots (one KV sequence each) and whether they share one cache.
    n_parallel: int = AUTO_PARALLEL
    kv_unified: bool = True
    # A draft model for speculative decoding, loaded beside the model: its
    # weights, its KV cache (the same context and cache types, one sequence per
    # slot within it) and its compute buffer are counted on the device that
    # holds the model's output head (a GPU when fully offloaded, else the host).
    draft: ModelShape | None = None


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
    stage: int = 0  # index into STAGES: the furthest thing this plan gave up
    hardware: Hardware | None = None
    paged_bytes: int = 0  # weights memory-mapped beyond the RAM budget (read from disk)
    objective: tuple[Any, ...] = ()  # the objective's value: larger is better (docs/planner.md)

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
    """One load the search considers."""

    cand: ModelCandidate
    type_k: str
    type_v: str
    n_ctx: int
    counts: tuple[int, ...]  # layers per GPU (the output head counts as one), all GPUs
    n_cpu_moe: int  # the first n layers keep their MoE experts in RAM
    paged: int = 0  # bytes over the RAM budget left to memory mapping

    @property
    def n_offloaded(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class _Scored:
    """A load with what the objective compares."""

    config: _Config
    tier: int
    ram_read: int  # weight bytes read from system RAM per token
    total_read: int  # weight bytes read per token, wherever they are
    key: tuple[Any, ...]


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
    options: list[tuple[int, ...]] = field(default_factory=list)  # GPU index sets to try
    _costs: dict[tuple[str, str, str, int], _Costs] = field(default_factory=dict)

    def draft_bytes(self, n_ctx: int, type_k: str, type_v: str) -> MemoryBreakdown | None:
        """The draft model's memory at this context (Pins.draft), on one device.

        The engine loads the draft whole onto the device that holds the
        model's output head: the GPU with the model's last layers when the
        model is fully offloaded, else the host (engine/serving/scheduler.py,
        `_load_draft`). Its KV has one sequence per slot, as the model's.
        """
        draft = self.pins.draft
        if draft is None:
            return None
        return estimate(
            draft,
            n_ctx=n_ctx,
            type_k=type_k,
            type_v=type_v,
            flash_attn=self.flash_attn,
            n_ubatch=self.pins.n_ubatch,
            host=self.host,
            n_seq=self.pins.n_parallel,
            kv_unified=self.pins.kv_unified,
        )

    def output_device(
        self, shape: ModelShape, n_gpu_layers: int, split: Sequence[float] | None
    ) -> str:
        """The device name (the host's for "CPU") holding the model's output head."""
        names = [g.name for g in self.gpus]
        where = layer_layout(shape.n_layer, names, n_gpu_layers, split).devices[-1]
        return self.host.name if where == "CPU" else where

    def with_draft(
        self,
        mem: MemoryBreakdown,
        n_ctx: int,
        type_k: str,
        type_v: str,
        sign: int = 1,
        device: str | None = None,
    ) -> MemoryBreakdown:
        """`mem` plus (sign -1: minus) the draft model's memory on `device` (the host by default)."""
        extra = self.draft_bytes(n_ctx, type_k, type_v)
        if extra is None:
            return mem
        device = device or self.host.name
        devices = [replace(d) for d in mem.devices]
        for d in devices:
            if d.name == device:
                d.weights += sign * extra.weights
                d.kv += sign * extra.kv
                d.compute += sign * extra.compute
                d.total += sign * extra.total
        return MemoryBreakdown(
            weights=mem.weights + sign * extra.weights,
            kv=mem.kv + sign * extra.kv,
            compute=mem.compute + sign * extra.compute,
            overhead=mem.overhead + sign * extra.overhead,
            total=mem.total + sign * extra.total,
            devices=devices,
        )

    def evaluate(self, c: _Config) -> MemoryBreakdown:
        shape = self.shapes[c.cand.file_name]
        ngl = _load_ngl(c, shape) if self.gpus else 0
        split = [float(n) for n in c.counts] if c.n_offloaded else None
        device = self.output_device(shape, ngl, split)
        return self.with_draft(self._evaluate(c), c.n_ctx, c.type_k, c.type_v, device=device)

    def _evaluate(self, c: _Config) -> MemoryBreakdown:
        shape = self.shapes[c.cand.file_name]
        return estimate(
            shape,
            n_ctx=c.n_ctx,
            type_k=c.type_k,
            type_v=c.type_v,
            flash_attn=self.flash_attn,
            n_gpu_layers=_load_ngl(c, shape) if self.gpus else 0,
            gpus=self.gpus,
            tensor_split=[float(n) for n in c.counts] if c.n_offloaded else None,
            n_cpu_moe=c.n_cpu_moe,
            n_ubatch=self.pins.n_ubatch,
            host=self.host,
            n_seq=self.pins.n_parallel,
            kv_unified=self.pins.kv_unified,
        )

    def fits(self, mem: MemoryBreakdown, paged: int = 0) -> bool:
        return not self.overshoot(mem, paged)

    def overshoot(self, mem: MemoryBreakdown, paged: int = 0) -> dict[str, int]:
        """Bytes over budget, per device ("total" for the cap); empty when it fits.

        `paged` bytes of the host's weights may stay on disk (a memory-mapped plan).
        """
        over: dict[str, int] = {}
        for d in mem.devices:
            if d.name == self.host.name:
                budget = self.host_budget + paged
            else:
                budget = self.gpu_budget.get(d.name, 0)
            if d.total > budget:
                over[d.name] = d.total - budget
        if self.cap is not None and mem.total - paged > self.cap:
            over["total"] = mem.total - paged - self.cap
        return over

    def costs(self, cand: ModelCandidate, type_k: str, type_v: str, n_ctx: int) -> _Costs:
        key = (cand.file_name, type_k, type_v, n_ctx)
        found = self._costs.get(key)
        if found is None:
            found = _Costs(self, self.shapes[cand.file_name], type_k, type_v, n_ctx)
            self._costs[key] = found
        return found


def _load_ngl(c: _Config, shape: ModelShape) -> int:
    return -1 if c.n_offloaded >= shape.n_layer + 1 else c.n_offloaded


class _Costs:
    """Per-layer bytes of one (file, KV types, context): device totals as prefix sums.

    Mirrors `estimate()` exactly (tests/test_planner.py checks it), so the search can
    try thousands of placements without building a breakdown for each.
    """

    def __init__(self, ctx: _Context, shape: ModelShape, type_k: str, type_v: str, n_ctx: int):
        n = shape.n_layer
        self.n = n
        self.shape = shape
        self.ctx = ctx
        self.n_ctx = n_ctx
        self.type_k, self.type_v = type_k, type_v
        n_ubatch = ctx.pins.n_ubatch
        dense = [lb - eb for lb, eb in zip(shape.layer_bytes, shape.expert_bytes, strict=True)]
        pins = ctx.pins
        kv = [
            kv_layer_bytes(
                shape,
                il,
                n_ctx,
                type_k,
                type_v,
                n_ubatch,
                n_seq=pins.n_parallel,
                kv_unified=pins.kv_unified,
            )
            for il in range(n)
        ]
        self.base = [0, *accumulate(d + k for d, k in zip(dense, kv, strict=True))]
        self.exp = [0, *accumulate(shape.expert_bytes)]
        self.moe = shape.is_moe
        # Per token a MoE layer reads its dense weights and the routed share of its experts.
        used = (
            min(1.0, shape.n_expert_used / shape.n_expert)
            if self.moe and shape.n_expert_used > 0
            else 1.0
        )
        self.read_dense = [0, *accumulate(dense)]
        self.read_exp = [0, *accumulate(int(e * used) for e in shape.expert_bytes)]
        self.head_gpu = shape.output_bytes + shape.tied_embedding_bytes
        self.head_read = shape.output_bytes + shape.tied_embedding_bytes
        self.total_read = self.read_dense[n] + self.read_exp[n] + self.head_read
        self.quantized = type_k not in FULL_PRECISION_KV or type_v not in FULL_PRECISION_KV
        self._compute: dict[tuple[bool, bool], int] = {}
        draft = ctx.draft_bytes(n_ctx, type_k, type_v)
        self.draft = draft.total if draft is not None else 0
        self.mtp_compute = mtp_compute_bytes(shape, n_ctx, n_ubatch, ctx.flash_attn, self.quantized)

    def compute(self, has_layers: bool, has_output: bool) -> int:
        key = (has_layers, has_output)
        if key not in self._compute:
            self._compute[key] = compute_bytes(
                self.shape,
                self.n_ctx,
                self.ctx.pins.n_ubatch,
                self.ctx.flash_attn,
                self.quantized,
                has_output=has_output,
                has_layers=has_layers,
            )
        return self._compute[key]

    def gpu(self, a: int, b: int, with_output: bool, n_cpu_moe: int, overhead: int) -> int:
        """One GPU holding real layers [a, b) (and the output head)."""
        if b <= a and not with_output:
            return 0
        first_expert = min(max(a, n_cpu_moe), b)
        total = self.base[b] - self.base[a] + self.exp[b] - self.exp[first_expert]
        if with_output:
            # The draft model goes where the output head is (Pins.draft).
            total += self.head_gpu + self.mtp_compute + self.draft
        return total + self.compute(b > a, with_output) + overhead

    def host(self, s: int, out_on_cpu: bool, n_cpu_moe: int) -> int:
        """The host with real layers [0, s) (and the output head when out_on_cpu)."""
        shape = self.shape
        moved_end = min(max(s, n_cpu_moe), self.n)
        total = shape.input_bytes + self.base[s] + self.exp[s] + self.exp[moved_end] - self.exp[s]
        if out_on_cpu:
            total += shape.output_bytes + self.mtp_compute + self.draft
        if s == 0 and not out_on_cpu:
            compute = 2 * self.ctx.pins.n_ubatch * shape.n_embd * 4
        else:
            compute = self.compute(s > 0 or (n_cpu_moe > 0 and self.moe), out_on_cpu)
        return total + compute + (shape.n_vocab + shape.n_embd) * 4

    def host_experts(self, s: int, n_cpu_moe: int) -> int:
        """Expert bytes the host holds (what a memory-mapped plan may page)."""
        return self.exp[min(max(s, n_cpu_moe), self.n)]

    def ram_read(self, s: int, out_on_cpu: bool, n_cpu_moe: int) -> int:
        """Weight bytes read from system RAM per token."""
        moved_end = min(max(s, n_cpu_moe), self.n)
        read = self.read_dense[s] + self.read_exp[moved_end]
        return read + (self.head_read if out_on_cpu else 0)


@dataclass(frozen=True)
class _Placement:
    counts: tuple[int, ...]
    cpu_layers: int  # real layers 0..cpu_layers-1 on the CPU
    out_on_cpu: bool
    n_cpu_moe: int
    paged: int

    @property
    def all_on_gpu(self) -> bool:
        return self.cpu_layers == 0 and not self.out_on_cpu


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
    if not 1 <= pins.n_parallel <= 64:
        raise PeregrineError(f"--parallel must be from 1 to 64, not {pins.n_parallel}")
    if pins.min_ctx < 16:
        raise PeregrineError(f"--min-ctx must be at least 16, not {pins.min_ctx}")
    if pins.total_budget_bytes is not None and pins.total_budget_bytes <= 0:
        raise PeregrineError("the memory budget must be positive")
    if pins.budget_bytes is not None:
        if any(b < 0 for b in pins.budget_bytes):
            raise PeregrineError("a device's memory budget cannot be negative")
        if not pins.budget_bytes or pins.budget_bytes[-1] <= 0:
            raise PeregrineError("the RAM budget (the last figure) must be positive")
    if pins.headroom_bytes < 0:
        raise PeregrineError("the headroom cannot be negative")


def _pick_runtime(hardware: Hardware, pins: Pins, gpus: Sequence[Device]) -> Runtime | None:
    """The pinned runtime, else one whose backend the GPUs in use run, else a cpu runtime.

    None: the llama.cpp built into Peregrine (no runtime installed for the job).
    """
    if pins.runtime:
        found = next((r for r in hardware.runtimes if r.name == pins.runtime), None)
        if found is None:
            raise PeregrineError(f"runtime {pins.runtime!r} is not installed")
        return found
    for g in gpus:
        found = next((r for r in hardware.runtimes if r.backend == g.backend), None)
        if found is not None:
            return found
    if gpus:
        # A GPU without its backend's runtime: Vulkan drives NVIDIA and AMD GPUs too.
        found = next((r for r in hardware.runtimes if r.backend == "vulkan"), None)
        if found is not None:
            return found
    return next(
        (r for r in sorted(hardware.runtimes, key=lambda r: r.name != "cpu") if r.backend == "cpu"),
        None,
    )


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


def device_budgets(hardware: Hardware, pins: Pins) -> tuple[list[int], int]:
    """Each GPU's budget and the RAM budget, in bytes (docs/planner.md, "Inputs")."""
    frees = [g.free for g in hardware.gpus] + [hardware.ram.available]
    if pins.budget_bytes is None:
        budgets = [max(0, f - pins.headroom_bytes) for f in frees]
    else:
        if len(pins.budget_bytes) != len(frees):
            raise PeregrineError(
                f"give one budget per device: {len(frees) - 1} GPU(s) and then RAM "
                f"({len(frees)} figures), not {len(pins.budget_bytes)}"
            )
        budgets = [min(b, f) for b, f in zip(pins.budget_bytes, frees, strict=True)]
    return budgets[:-1], budgets[-1]


def _make_context(hardware: Hardware, pins: Pins, shapes: dict[str, ModelShape]) -> _Context:
    gpu_budgets, host_budget = device_budgets(hardware, pins)
    use_gpus = pins.n_gpu_layers != 0 and bool(hardware.gpus)
    gpus = (
        [
            Device(name, g.backend, g.free)
            for name, g in zip(device_names(hardware.gpus), hardware.gpus, strict=True)
        ]
        if use_gpus
        else []
    )
    host = Device("CPU", "cpu", hardware.ram.available)
    ctx = _Context(
        hardware=hardware,
        pins=pins,
        shapes=shapes,
        gpus=gpus,
        gpu_budget={d.name: b for d, b in zip(gpus, gpu_budgets, strict=False)},
        host=host,
        host_budget=host_budget,
        cap=pins.total_budget_bytes,
        flash_attn=(pins.flash_attn or "on") != "off",
        runtime=_pick_runtime(hardware, pins, gpus),
    )
    # Every set of GPUs (fewer GPUs, less split cost), or with many GPUs each alone and
    # all together. The options do not depend on free memory, so more memory only
    # ever adds loads that fit.
    n = len(gpus)
    if n <= MAX_GPU_SUBSETS:
        ctx.options.extend(tuple(i for i in range(n) if mask >> i & 1) for mask in range(1, 1 << n))
    else:
        ctx.options.extend((i,) for i in range(n))
        ctx.options.append(tuple(range(n)))
    return ctx


def _kv_pairs(ctx: _Context) -> list[tuple[str, str]]:
    """The KV ladder, best first: f16, q8_0, q4_0 (V stays f16 without flash attention)."""
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


def _ctx_options(lo: int, hi: int) -> list[int]:
    """Contexts tried between lo and hi: both ends and every multiple of 1024 between."""
    return sorted({lo, hi, *range((lo + 1023) // 1024 * 1024, hi, 1024)})


def _max_true(ok: Callable[[int], bool], n: int) -> int:
    """The largest i in [0, n) with ok(i), for ok true then false; -1 when ok(0) fails."""
    if n <= 0 or not ok(0):
        return -1
    good, bad = 0, n
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


@dataclass
class _Search:
    """One planning run's search over files, KV types, contexts and placements."""

    ctx: _Context
    ordered: list[ModelCandidate]
    above_floor: set[str]
    target: int
    min_ctx: int
    pairs: list[tuple[str, str]]
    max_offload: int | None  # pinned --gpu-layers N > 0 (the output head counts as one)
    all_layers_pinned: bool  # --gpu-layers -1

    def kv_rank(self, pair: tuple[str, str]) -> int:
        return len(self.pairs) - 1 - self.pairs.index(pair)

    def planner_q4(self, pair: tuple[str, str]) -> bool:
        """q4_0 chosen by the planner (not pinned): only to reach min_ctx."""
        return len(self.pairs) > 1 and pair == self.pairs[-1]

    # --- placements -----------------------------------------------------------

    def fill(self, costs: _Costs, option: tuple[int, ...], n_cpu_moe: int) -> _Placement:
        """The most layers on the GPUs of `option`, filled from the back as llama.cpp lays
        them out: the last GPU takes the output head and the last layers, the one before
        it the layers before those, and the first layers stay on the CPU."""
        ctx = self.ctx
        counts = [0] * len(ctx.gpus)
        top = costs.n  # real layers [0, top) are not placed yet
        out_placed = False
        left = costs.n + 1 if self.max_offload is None else self.max_offload
        for g in reversed(option):
            if left <= 0:
                break
            dev = ctx.gpus[g]
            budget = ctx.gpu_budget[dev.name]
            overhead = BACKEND_OVERHEAD.get(dev.backend, DEFAULT_BACKEND_OVERHEAD)
            with_output = not out_placed
            room = min(top, left - 1 if with_output else left)

            def fits(
                k: int, t: int = top, out: bool = with_output, ov: int = overhead, b: int = budget
            ) -> bool:
                return costs.gpu(t - k, t, out, n_cpu_moe, ov) <= b

            if with_output:
                k = _max_true(fits, room + 1)
                if k < 0:
                    continue  # not even the output head: an earlier GPU may take it
                counts[g] = k + 1
                out_placed = True
            else:
                k = _max_true(fits, room + 1)
                if k <= 0:
                    continue
                counts[g] = k
            top -= k
            left -= counts[g]
        if not out_placed:
            return _Placement((0,) * len(ctx.gpus), costs.n, True, n_cpu_moe, 0)
        return _Placement(tuple(counts), top, False, n_cpu_moe, 0)

    def host_fits(self, costs: _Costs, p: _Placement, paged_ok: bool) -> _Placement | None:
        """The placement if the host (and the total cap) hold it, with what it must page."""
        ctx = self.ctx
        host = costs.host(p.cpu_layers, p.out_on_cpu, p.n_cpu_moe)
        over = host - ctx.host_budget
        paged = 0
        if over > 0:
            experts = costs.host_experts(p.cpu_layers, p.n_cpu_moe)
            if not paged_ok or over > MAX_PAGED_SHARE * experts:
                return None
            paged = over
        if ctx.cap is not None:
            total = host - paged + self.gpu_total(costs, p)
            if total > ctx.cap:
                return None
        return replace(p, paged=paged)

    def gpu_total(self, costs: _Costs, p: _Placement) -> int:
        total, top = 0, costs.n
        out = not p.out_on_cpu
        for g in reversed(range(len(self.ctx.gpus))):
            k = p.counts[g]
            if not k:
                continue
            dev = self.ctx.gpus[g]
            overhead = BACKEND_OVERHEAD.get(dev.backend, DEFAULT_BACKEND_OVERHEAD)
            real = k - 1 if out else k
            total += costs.gpu(top - real, top, out, p.n_cpu_moe, overhead)
            top -= real
            out = False
        return total

    def all_on_gpu(
        self, costs: _Costs, option: tuple[int, ...], paged_ok: bool
    ) -> _Placement | None:
        """Every layer on the GPUs of `option`, with the fewest layers' experts in RAM."""
        if self.max_offload is not None and self.max_offload < costs.n + 1:
            return None
        n_options = costs.n + 1 if costs.moe else 1

        def gpu_ok(n_cpu_moe: int) -> bool:
            return self.fill(costs, option, n_cpu_moe).all_on_gpu

        # GPU use falls as more experts move to RAM: find the fewest that fit.
        if not gpu_ok(n_options - 1):
            return None
        lo, hi = -1, n_options - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if gpu_ok(mid):
                hi = mid
            else:
                lo = mid
        return self.host_fits(costs, self.fill(costs, option, hi), paged_ok)

    def most_on_gpu(
        self, costs: _Costs, option: tuple[int, ...], paged_ok: bool
    ) -> _Placement | None:
        """The most weight reads on the GPUs of `option`, some layers on the CPU allowed."""
        if self.all_layers_pinned:
            return None
        best: _Placement | None = None
        best_read = 0
        for n_cpu_moe in (0, costs.n) if costs.moe else (0,):
            p = self.host_fits(costs, self.fill(costs, option, n_cpu_moe), paged_ok)
            if p is None:
                continue
            read = costs.ram_read(p.cpu_layers, p.out_on_cpu, p.n_cpu_moe)
            if best is None or read < best_read:
                best, best_read = p, read
        return best

    # --- the objective --------------------------------------------------------

    def score(self, costs: _Costs, cand: ModelCandidate, p: _Placement) -> _Scored:
        pair = (costs.type_k, costs.type_v)
        ram = costs.ram_read(p.cpu_layers, p.out_on_cpu, p.n_cpu_moe)
        share = 1 - ram / costs.total_read if costs.total_read else 0.0
        if p.all_on_gpu:
            tier = TIER_GPU
        elif share >= PARTIAL_OFFLOAD_MIN_SHARE and costs.n_ctx == self.min_ctx:
            tier = TIER_PARTIAL
        else:
            tier = TIER_CPU
        quality = len(self.ordered) - self.ordered.index(cand)
        n_gpus = sum(1 for n in p.counts if n)
        kv = self.kv_rank(pair)
        if tier == TIER_GPU:
            rest: tuple[int, ...] = (costs.n_ctx, -ram, quality, kv, -n_gpus)
        elif tier == TIER_PARTIAL:
            rest = (costs.n_ctx, -ram, quality, kv, -n_gpus)
        else:
            rest = (costs.n_ctx, quality, kv, -ram, -n_gpus)
        key = (
            p.paged == 0,
            cand.file_name in self.above_floor,
            not self.planner_q4(pair),
            tier,
            -p.paged,
            *rest,
        )
        config = _Config(
            cand, costs.type_k, costs.type_v, costs.n_ctx, p.counts, p.n_cpu_moe, p.paged
        )
        return _Scored(config, tier, ram, costs.total_read, key)

    def valid(self, s: _Scored, costs: _Costs) -> bool:
        """Partial offloads with a share worth a shorter context run at min_ctx only."""
        if s.tier != TIER_CPU:
            return True
        return (
            1 - s.ram_read / costs.total_read < PARTIAL_OFFLOAD_MIN_SHARE if s.total_read else True
        )

    def best_for(
        self, cand: ModelCandidate, pair: tuple[str, str], option: tuple[int, ...], paged: bool
    ) -> Iterator[_Scored]:
        """The best load of each tier for one file, KV pair and GPU set."""
        ctx = self.ctx
        if paged or self.planner_q4(pair):
            contexts = [self.min_ctx]
        else:
            contexts = _ctx_options(self.min_ctx, self.target)

        def costs_at(i: int) -> _Costs:
            return ctx.costs(cand, pair[0], pair[1], contexts[i])

        if option and not paged:
            # Tier 2: the longest context with every layer on the GPUs.
            i = _max_true(
                lambda i: self.all_on_gpu(costs_at(i), option, False) is not None, len(contexts)
            )
            if i >= 0:
                p = self.all_on_gpu(costs_at(i), option, False)
                assert p is not None
                yield self.score(costs_at(i), cand, p)
        if paged and option:
            p = self.all_on_gpu(costs_at(0), option, True)
            if p is not None:
                yield self.score(costs_at(0), cand, p)
        # Tier 1 at min_ctx, and tier 0: the longest context the host (helped by the
        # GPUs) holds.
        first = costs_at(0)
        p = self.most_on_gpu(first, option, paged)
        if p is not None:
            yield self.score(first, cand, p)
        i = _max_true(
            lambda i: self.most_on_gpu(costs_at(i), option, paged) is not None, len(contexts)
        )
        if i > 0:
            p = self.most_on_gpu(costs_at(i), option, paged)
            assert p is not None
            s = self.score(costs_at(i), cand, p)
            if self.valid(s, costs_at(i)):
                yield s

    def run(self) -> _Scored | None:
        options = self.ctx.options or [()]
        for paged in (False, True):
            best: _Scored | None = None
            for cand in self.ordered:
                for pair in self.pairs:
                    for option in options:
                        for s in self.best_for(cand, pair, option, paged):
                            if best is None or s.key > best.key:
                                best = s
            if best is not None:
                return best
        return None


def _search(ctx: _Context, candidates: list[ModelCandidate]) -> Plan:
    pins = ctx.pins
    ordered = sorted(candidates, key=_quality_key)
    above = {c.file_name for c in ordered if c.bits_per_weight >= QUALITY_FLOOR_BPW}
    notes: list[str] = []
    if not above:
        above = {c.file_name for c in ordered}
        notes.append(
            f"every file is below the ~{QUALITY_FLOOR_BPW} bpw quality floor; using the best of them"
        )
    shape0 = ctx.shapes[ordered[0].file_name]
    # Capped at what a LoadRequest accepts (4 Mi tokens): a header may claim more.
    trained = min(shape0.n_ctx_train, MAX_N_CTX)
    target = pins.ctx or trained
    min_ctx = pins.ctx or min(pins.min_ctx, trained, target)
    ngl = pins.n_gpu_layers
    search = _Search(
        ctx=ctx,
        ordered=ordered,
        above_floor=above,
        target=target,
        min_ctx=min_ctx,
        pairs=_kv_pairs(ctx),
        max_offload=ngl if ngl is not None and ngl > 0 else None,
        all_layers_pinned=ngl == -1,
    )
    best = search.run()
    if best is None:
        raise PeregrineError(_nothing_fits(ctx, ordered[-1], search.pairs[-1], min_ctx))
    return _make_plan(ctx, search, best, notes)


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
    how = (
        "the budgets given"
        if ctx.pins.budget_bytes is not None
        else f"free memory minus {_gib(ctx.pins.headroom_bytes)} headroom per device"
    )
    return (
        f"{smallest.file_name} does not fit: even {smallest.quant} with {min_ctx} tokens of "
        f"context and a {pair[0]} KV cache needs {_gib(need)}, and {_gib(have)} is available "
        f"({how})"
    )


def _stage(search: _Search, c: _Config, full_offload: bool) -> int:
    """The furthest item of STAGES this load gave up."""
    given_up = [0]
    best_pair = search.pairs[0]
    if len(search.pairs) > 1 and (c.type_k, c.type_v) != best_pair:
        given_up.append(4 if search.planner_q4((c.type_k, c.type_v)) else 1)
    if c.cand.file_name != search.ordered[0].file_name:
        given_up.append(2)
    if c.n_ctx < search.target:
        given_up.append(3)
    if not full_offload and c.n_offloaded:
        given_up.append(5)
    if c.cand.file_name not in search.above_floor:
        given_up.append(6)
    if c.paged:
        given_up.append(7)
    return max(given_up)


def _make_plan(ctx: _Context, search: _Search, best: _Scored, notes: list[str]) -> Plan:
    pins = ctx.pins
    c = best.config
    mem = ctx.evaluate(c)
    if not ctx.fits(mem, c.paged):
        # The search's prefix sums and the estimate disagree: a bug, never a silent overrun.
        raise PeregrineError(f"internal planner error: the chosen load does not fit ({c})")
    shape = ctx.shapes[c.cand.file_name]
    ordered = search.ordered
    best_file = ordered[0]
    n_all = shape.n_layer + 1  # llama.cpp counts the output head as a layer
    ngl = _load_ngl(c, shape) if ctx.gpus else 0
    used = [d.name for d, n in zip(ctx.gpus, c.counts, strict=True) if n]
    on_gpu_layers = c.n_offloaded
    cpu_layers = n_all - on_gpu_layers if ctx.gpus else n_all
    experts_in_ram = min(c.n_cpu_moe, shape.n_layer) if shape.is_moe else 0
    # Experts of layers that run on the CPU are in RAM anyway; count those the load moves.
    moved_experts = max(0, experts_in_ram - max(0, n_all - on_gpu_layers)) if used else 0
    full_offload = bool(used) and cpu_layers == 0 and moved_experts == 0
    reasons: list[str] = list(notes)
    reasons.append(_describe_budget(ctx))
    if c.paged:
        host_experts = sum(shape.expert_bytes[: max(experts_in_ram, cpu_layers)])
        share = c.paged / host_experts if host_experts else 1.0
        slower = 1 + share * RAM_OVER_DISK_SPEED
        reasons.append(
            f"weights memory-mapped, slower: {_gib(c.paged)} of the {_gib(host_experts)} of "
            f"experts in system RAM do not fit and are read from disk as tokens need them; "
            f"expect roughly {slower:.1f}x slower generation than if they fit (RAM reads "
            f"~{RAM_OVER_DISK_SPEED:.0f}x faster than an NVMe SSD; a slower disk is slower still)"
        )
    stage = _stage(search, c, full_offload or not ctx.gpus)
    if stage == 0:
        reasons.append("everything fits: no compromise needed")
    pair = (c.type_k, c.type_v)
    if pins.type_k or pins.type_v:
        if pair != ("f16", "f16"):
            reasons.append(f"KV cache {c.type_k}/{c.type_v}: pinned")
    elif search.planner_q4(pair):
        reasons.append(
            f"KV cache {c.type_k}/{c.type_v}: nothing else reaches the minimum context of "
            f"{search.min_ctx} tokens; a 4-bit cache costs some quality, so the context is not "
            "lengthened past that minimum with it"
        )
    elif pair != search.pairs[0]:
        reasons.append(
            f"KV cache {c.type_k}/{c.type_v} instead of f16 to save memory "
            "(q8_0 is near-lossless with llama.cpp's Hadamard rotation of K/V)"
        )
    if c.cand.file_name != best_file.file_name:
        below = c.cand.file_name not in search.above_floor
        reasons.append(
            f"quant {c.cand.quant} ({c.cand.bits_per_weight:.2f} bpw) instead of {best_file.quant}"
            + (
                f": below the ~{QUALITY_FLOOR_BPW} bpw quality floor, because nothing at or above it fits"
                if below
                else (
                    " to keep the whole model in fast memory"
                    if full_offload or not ctx.gpus
                    else " so more of the model fits on the GPU"
                    if best.tier != TIER_CPU
                    else " to fit"
                )
            )
        )
    target = search.target
    if c.n_ctx < target:
        why = " to fit"
        if best.tier == TIER_PARTIAL and target > search.min_ctx:
            why = (
                ": the minimum, since layers stay on the CPU and every byte of GPU memory "
                "goes to weights"
            )
        elif c.paged:
            why = ": the minimum, to page as little as possible"
        reasons.append(
            f"context {c.n_ctx} tokens instead of {target}"
            + (" (the trained context)" if target == shape.n_ctx_train else "")
            + why
        )
    elif pins.ctx:
        reasons.append(f"context {c.n_ctx} tokens: pinned")
    else:
        reasons.append(f"context {c.n_ctx} tokens: the model's full trained context")
    if ctx.gpus:
        reasons.extend(_describe_offload(ctx, c, best, shape, used, cpu_layers, experts_in_ram))
    else:
        reasons.append("CPU only: zero GPU layers")
    if ctx.flash_attn:
        reasons.append(
            "flash attention on: smaller compute buffers, and needed for a quantized V cache"
        )
    else:
        reasons.append("flash attention off (pinned): V cache stays f16")
    runtime = ctx.runtime if used or pins.runtime else _pick_runtime(ctx.hardware, pins, [])
    if (
        used
        and ctx.flash_attn
        and not (
            ctx.runtime.has_fa_kernel(c.type_k, c.type_v)
            if ctx.runtime is not None
            else c.type_k == c.type_v
        )
    ):
        reasons.append(
            f"warning: K {c.type_k} / V {c.type_v} has no fast flash-attention kernel on this "
            "runtime (other pairs need a runtime built with them in GGML_CUDA_FA_QUANTS)"
        )
    # LoadRequest takes at most 1024 threads; more cores than that gain nothing here.
    threads = pins.threads or min(ctx.hardware.cpu.physical_cores, 1024)
    reasons.append(
        f"threads = {threads} (physical cores)"
        if not pins.threads
        else f"threads = {threads}: pinned"
    )
    if runtime is not None:
        reasons.append(f"runtime {runtime.name} ({runtime.backend})")
    elif used:
        reasons.append(
            f"no installed runtime for {ctx.gpus[0].backend}: the built-in llama.cpp must have "
            "that backend"
        )
    reasons.extend(shape.notes)
    heads = f"{shape.nextn_layers} MTP head{'s' if shape.nextn_layers != 1 else ''}"
    if shape.mtp:
        reasons.append(
            f"{heads}: loaded to draft for speculative decoding (their context's KV and "
            "compute buffer are counted)"
        )
    elif shape.nextn_layers:
        reasons.append(
            f"{heads} in the file, not loaded: the engine runs MTP heads of "
            f"{', '.join(sorted(MTP_ARCHITECTURES))} models only"
        )
    reasons.append(_describe_fit(ctx, mem))
    split = [float(n) for n in c.counts] if used and len(ctx.gpus) > 1 else None
    load = LoadRequest(
        model=c.cand.path or c.cand.file_name,
        runtime=runtime.name if runtime is not None else None,
        n_ctx=c.n_ctx,
        n_gpu_layers=ngl if used else 0,
        tensor_split=split,
        expert_offload=bool(used) and shape.is_moe and experts_in_ram >= shape.n_layer,
        n_cpu_moe=experts_in_ram if used and experts_in_ram < shape.n_layer else 0,
        type_k=c.type_k,  # type: ignore[arg-type]
        type_v=c.type_v,  # type: ignore[arg-type]
        flash_attn="on" if ctx.flash_attn else "off",
        n_batch=pins.n_batch,
        n_ubatch=pins.n_ubatch,
        threads=threads,
        n_parallel=pins.n_parallel,
        kv_unified=pins.kv_unified,
    )
    return Plan(
        load=load,
        quant_file=c.cand.file_name,
        reasons=reasons,
        memory=mem,
        method="estimated",
        stage=stage,
        hardware=ctx.hardware,
        paged_bytes=c.paged,
        objective=best.key,
    )


def _describe_offload(
    ctx: _Context,
    c: _Config,
    best: _Scored,
    shape: ModelShape,
    used: list[str],
    cpu_layers: int,
    experts_in_ram: int,
) -> list[str]:
    """What runs where, and why; never contradicts the load."""
    n_all = shape.n_layer + 1
    out: list[str] = []
    ram_share = best.ram_read / best.total_read if best.total_read else 0.0
    if not used:
        if ctx.pins.n_gpu_layers is None:
            out.append(
                "no layer fits in the GPU budget at this context: running on the CPU, "
                "as on a machine without a GPU"
            )
        else:
            out.append("running on the CPU")
        return out
    where = " + ".join(used)
    if cpu_layers == 0:
        out.append(f"all {n_all} layers on {where}")
    else:
        out.append(
            f"partial offload: {c.n_offloaded} of {n_all} layers on {where}, "
            f"the first {cpu_layers} on the CPU (slower)"
        )
    if experts_in_ram and shape.is_moe:
        on_gpu_moe = max(0, experts_in_ram - cpu_layers)
        if on_gpu_moe:
            flag = (
                "--cpu-moe" if experts_in_ram >= shape.n_layer else f"--n-cpu-moe {experts_in_ram}"
            )
            out.append(
                f"MoE experts of the first {experts_in_ram} of {shape.n_layer} layers kept in "
                f"system RAM (llama.cpp's {flag}); the rest of those layers, and every other "
                "layer whole, on the GPU"
            )
    if best.tier == TIER_CPU:
        out.append(
            f"the GPUs hold too little to be worth a shorter context: {1 - ram_share:.0%} of "
            "the weights read per token are on the GPU, so the context is kept"
        )
    if ram_share > 0:
        out.append(
            f"per token {_gib(best.ram_read)} of weights are read from system RAM "
            f"({ram_share:.0%} of {_gib(best.total_read)})"
        )
    if len(used) > 1:
        out.append(
            "layers split across GPUs to fit the most on them: "
            + ", ".join(f"{d.name} {n}" for d, n in zip(ctx.gpus, c.counts, strict=True) if n)
        )
    elif len(ctx.gpus) > 1:
        idle = [d.name for d in ctx.gpus if d.name not in used]
        if cpu_layers == 0 and not experts_in_ram:
            out.append(f"one GPU ({used[0]}) is enough: no split")
        else:
            out.append(
                f"{', '.join(idle)} unused: its budget holds no further layer at this context"
            )
    return out


def _describe_budget(ctx: _Context) -> str:
    parts = [f"{d.name} {_gib(ctx.gpu_budget[d.name])}" for d in ctx.gpus]
    parts.append(f"RAM {_gib(ctx.host_budget)}")
    if ctx.pins.budget_bytes is not None:
        how = "as given, at most each device's free memory"
    else:
        how = f"free memory minus {_gib(ctx.pins.headroom_bytes)} headroom each"
    text = "budget: " + ", ".join(parts) + f" ({how})"
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
    plan_pins = pins
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
        ctx = _make_context(
            hardware, pins, {candidate.file_name: shape_from_header(candidate.header)}
        )
        # The dry run loads the model alone: the draft model stays estimated.
        load = current.load
        shape = ctx.shapes[candidate.file_name]
        at = ctx.output_device(shape, load.n_gpu_layers, load.tensor_split)
        target_only = ctx.with_draft(
            current.memory, load.n_ctx, load.type_k, load.type_v, -1, device=at
        )
        mem = ctx.with_draft(
            measured_breakdown(target_only, measured),
            load.n_ctx,
            load.type_k,
            load.type_v,
            device=at,
        )
        over = ctx.overshoot(mem, current.paged_bytes)
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
        if plan_pins.budget_bytes is not None:
            # Budgets given per device shrink too (the check below keeps the user's).
            names = [*device_names(hardware.gpus), ctx.host.name]
            plan_pins = replace(
                plan_pins,
                budget_bytes=tuple(
                    max(0, b - error.get(n, 0) - error.get("total", 0))
                    for n, b in zip(names, plan_pins.budget_bytes, strict=True)
                ),
            )
        current = plan(adjusted, [candidate], plan_pins)
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
    elif ngl == -1 and not p.load.expert_offload and not p.load.n_cpu_moe:
        level = "gpu"
        summary = f"fits on the GPU, {p.load.n_ctx} tokens, {_gib(p.memory.total)}"
    else:
        level = "partial"
        if ngl != -1:
            how = f"{ngl} layers on the GPU"
        elif p.load.expert_offload:
            how = "experts in RAM"
        else:
            how = f"experts of {p.load.n_cpu_moe} layers in RAM"
        summary = f"partial offload ({how}), {p.load.n_ctx} tokens, {_gib(p.memory.total)}"
    if p.paged_bytes:
        summary += ", weights memory-mapped (slower)"
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
