"""The VRAM-budget wizard's logic, without Qt: budgets, settings, the memory per device, the plan.

One `LoadWizard` holds one model on one machine (detected, or described by a
`hardware` object as `peregrine profile --json` prints it). The dialog sets
budgets and load settings through it and draws `view()`: a bar per device
(weights, KV cache, compute, overhead, headroom), what will not fit, and the
LoadRequest that Apply sends. Figures come from the planner's estimator, so
they equal `peregrine profile --json` for the same inputs; on this machine a
dry run (engine/planning/probe.py, in a child process) may then replace them
with llama.cpp's own (`set_measured`).

Placement (GPU layers, MoE experts in RAM, the split over GPUs) is the
planner's while `auto_placement` is on: it plans with the user's context, KV
types, flash attention and budgets pinned, exactly as `profile --ctx N
--cache-type-k T --cache-type-v T --flash-attn F --budget-gib B1,B2` does.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from engine.errors import PeregrineError
from engine.gguf.header import GGUFHeader, validate_gguf_file
from engine.planning.estimate import (
    GIB,
    Device,
    MemoryBreakdown,
    ModelShape,
    estimate,
    shape_from_header,
)
from engine.planning.hardware import Hardware
from engine.planning.planner import (
    DEFAULT_HEADROOM,
    ModelCandidate,
    Pins,
    Plan,
    device_budgets,
    device_names,
    measured_breakdown,
    plan,
)
from engine.planning.probe import MeasuredMemory
from engine.wire.base import MAX_N_CTX, FlashAttn, KVType
from engine.wire.control import AUTO_PARALLEL, LoadRequest

log = logging.getLogger(__name__)

MIB = 1 << 20
KV_TYPES: tuple[KVType, ...] = get_args(KVType)
FULL_PRECISION = ("f32", "f16", "bf16")
MIN_CTX = 256
# The RAM budget cannot be 0: the host always holds the token embeddings and buffers.
MIN_RAM_BUDGET = 256 * MIB
Method = Literal["measured", "estimated"]


def gib(n: int) -> str:
    """Bytes as GiB with one decimal, as the planner's reasons write them."""
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Choices:
    """What the user set in the wizard; placement fields are the planner's while auto."""

    n_ctx: int
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: FlashAttn = "on"
    auto_placement: bool = True
    n_gpu_layers: int = 0  # -1: every layer (LoadRequest's meaning)
    n_cpu_moe: int = 0  # MoE experts of the first n layers in RAM; n_layer or more: all
    tensor_split: tuple[float, ...] | None = None
    threads: int = 0
    n_parallel: int = AUTO_PARALLEL  # parallel slots, sharing one unified KV cache


@dataclass(frozen=True)
class DeviceBar:
    """One device's share of the load against its budget, in bytes."""

    name: str  # llama.cpp's name: CUDA0, Vulkan1, CPU
    title: str  # what the user knows it as
    free: int
    budget: int
    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead

    @property
    def headroom(self) -> int:
        """What stays free of the budget."""
        return max(0, self.budget - self.used)

    @property
    def over(self) -> int:
        """How far the load exceeds the budget (0 when it fits)."""
        return max(0, self.used - self.budget)

    def segments(self) -> list[tuple[str, int]]:
        """The bar's parts in drawing order."""
        return [
            ("weights", self.weights),
            ("kv", self.kv),
            ("compute", self.compute),
            ("overhead", self.overhead),
            ("headroom", self.headroom),
        ]


@dataclass(frozen=True)
class Recommendation:
    """The planner's choice for these budgets, or why nothing fits."""

    plan: Plan | None
    error: str | None = None

    @property
    def reasons(self) -> list[str]:
        return list(self.plan.reasons) if self.plan is not None else []

    def summary(self) -> str:
        if self.plan is None:
            return f"Nothing fits these budgets: {self.error}"
        load = self.plan.load
        kv = load.type_k if load.type_k == load.type_v else f"{load.type_k}/{load.type_v}"
        return f"{load.n_ctx:,} tokens, KV cache {kv}, {placement_text(load)}"


@dataclass(frozen=True)
class WizardView:
    """Everything the dialog draws for the current budgets and settings."""

    bars: list[DeviceBar]
    method: Method
    method_note: str
    problems: list[str]  # what will not fit or cannot work, said before loading
    notes: list[str]  # worth knowing, not in the way
    choices: Choices
    request: LoadRequest

    @property
    def fits(self) -> bool:
        return not self.problems


def placement_text(load: LoadRequest) -> str:
    """Where the layers go, in words."""
    if load.n_gpu_layers == 0:
        where = "CPU only"
    elif load.n_gpu_layers == -1:
        where = "all layers on the GPU"
    else:
        where = f"{load.n_gpu_layers} layers on the GPU"
    if load.n_gpu_layers != 0:
        if load.expert_offload:
            where += ", MoE experts in RAM"
        elif load.n_cpu_moe:
            where += f", MoE experts of {load.n_cpu_moe} layers in RAM"
        if load.tensor_split:
            where += " (split " + " : ".join(f"{s:g}" for s in load.tensor_split) + ")"
    return where


def runtime_text(hardware: Hardware, load: LoadRequest | None) -> str:
    """The runtime a load would use: an installed one, or the llama.cpp built into Peregrine."""
    if load is not None and load.runtime:
        found = next((r for r in hardware.runtimes if r.name == load.runtime), None)
        backend = f" ({found.backend})" if found is not None else ""
        return f"{load.runtime}{backend}"
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    installed = ", ".join(f"{r.name} ({r.backend})" for r in hardware.runtimes)
    text = f"built-in llama.cpp (llama-cpp-python {version})"
    return text + (f"; installed: {installed}" if installed else "")


def hardware_lines(hardware: Hardware) -> list[str]:
    """The detected (or described) hardware, one line each; what could not be probed last."""
    lines = []
    for name, g in zip(device_names(hardware.gpus), hardware.gpus, strict=True):
        cc = f", compute {g.compute_capability}" if g.compute_capability else ""
        lines.append(
            f"GPU {name}: {g.name} ({g.backend}{cc}), {gib(g.free)} free of {gib(g.total)}"
        )
    if not hardware.gpus:
        lines.append("GPU: none found")
    cpu = hardware.cpu
    flags = f"; {', '.join(cpu.flags[:8])}" if cpu.flags else ""
    lines.append(
        f"CPU: {cpu.name}, {cpu.physical_cores} cores / {cpu.logical_cores} threads{flags}"
    )
    lines.append(f"RAM: {gib(hardware.ram.available)} available of {gib(hardware.ram.total)}")
    lines.extend(f"Not probed: {m}" for m in hardware.missing)
    return lines


@dataclass
class LoadWizard:
    """One model on one machine: budgets, choices, and what they take per device."""

    hardware: Hardware
    model: Path
    header: GGUFHeader
    described: bool = False  # a machine described by a hardware file: never dry-run
    draft_model: str | None = None  # kept from the model's remembered settings
    headroom: int = DEFAULT_HEADROOM
    shape: ModelShape = field(init=False)
    names: list[str] = field(init=False)  # GPUs, then "CPU"
    budgets: list[int] = field(init=False)
    choices: Choices = field(init=False)
    _recommendation: Recommendation | None = field(init=False, default=None)
    _placement_error: str | None = field(init=False, default=None)
    _paged: int = field(init=False, default=0)
    _measured: dict[str, MeasuredMemory] = field(init=False, default_factory=dict)
    _measure_error: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.shape = shape_from_header(self.header)
        self.names = [*device_names(self.hardware.gpus), "CPU"]
        gpu_budgets, ram_budget = device_budgets(self.hardware, Pins(headroom_bytes=self.headroom))
        self.budgets = [*gpu_budgets, max(MIN_RAM_BUDGET, ram_budget)]
        self.choices = Choices(n_ctx=self.max_ctx, threads=self.hardware.cpu.physical_cores)
        if not self.use_recommended():
            # Nothing fits: start from a CPU load at the minimum context, and say why.
            self.choices = replace(self.choices, n_ctx=min(self.max_ctx, 4096))
            self._place()

    @classmethod
    def open(
        cls,
        model: Path,
        hardware: Hardware,
        *,
        described: bool = False,
        draft_model: str | None = None,
    ) -> LoadWizard:
        """Reads the model's header (a blocking read: call it off the GUI thread)."""
        header = validate_gguf_file(model)
        return cls(hardware, model, header, described=described, draft_model=draft_model)

    # what the model and the machine allow ---------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.shape.n_layer

    @property
    def is_moe(self) -> bool:
        return self.shape.is_moe

    @property
    def has_gpus(self) -> bool:
        return bool(self.hardware.gpus)

    @property
    def max_ctx(self) -> int:
        return max(MIN_CTX, min(self.shape.n_ctx_train or MAX_N_CTX, MAX_N_CTX))

    def free(self, index: int) -> int:
        """Device `index`'s free memory (GPUs in order, then RAM)."""
        if index < len(self.hardware.gpus):
            return self.hardware.gpus[index].free
        return self.hardware.ram.available

    def title(self, index: int) -> str:
        if index < len(self.hardware.gpus):
            return f"{self.hardware.gpus[index].name} ({self.names[index]})"
        return "System RAM"

    def default_budget(self, index: int) -> int:
        """Free memory minus the headroom (the planner's default budget)."""
        floor = MIN_RAM_BUDGET if index == len(self.names) - 1 else 0
        return max(floor, self.free(index) - self.headroom)

    # changes ---------------------------------------------------------------------------

    def set_budget(self, index: int, value: int) -> None:
        """One device's budget in bytes, kept between 0 (RAM: 256 MiB) and its free memory."""
        floor = MIN_RAM_BUDGET if index == len(self.names) - 1 else 0
        value = max(floor, min(int(value), self.free(index)))
        if value != self.budgets[index]:
            self.budgets[index] = value
            self._recommendation = None
            self._place()

    def set_choices(self, **changes: Any) -> None:
        """Changes settings (Choices' field names); touching placement turns auto placement off."""
        if {"n_gpu_layers", "n_cpu_moe"} & changes.keys() and "auto_placement" not in changes:
            changes["auto_placement"] = False
        if "n_ctx" in changes:
            changes["n_ctx"] = max(MIN_CTX, min(int(changes["n_ctx"]), self.max_ctx))
        if "n_gpu_layers" in changes and not self.has_gpus:
            changes["n_gpu_layers"] = 0
        self.choices = replace(self.choices, **changes)
        self._place()

    def recommendation(self) -> Recommendation:
        """The planner's best load for the current budgets (nothing pinned but them)."""
        if self._recommendation is None:
            try:
                found = plan(self.hardware, [self._candidate()], self._pins())
            except PeregrineError as exc:
                self._recommendation = Recommendation(None, str(exc))
            else:
                self._recommendation = Recommendation(found)
        return self._recommendation

    def use_recommended(self) -> bool:
        """Takes the planner's load as the settings; False when nothing fits."""
        rec = self.recommendation()
        if rec.plan is None:
            return False
        load = rec.plan.load
        self.choices = replace(
            self.choices,
            n_ctx=load.n_ctx,
            type_k=load.type_k,
            type_v=load.type_v,
            flash_attn=load.flash_attn,
            threads=load.threads,
            n_parallel=load.n_parallel,
            auto_placement=True,
        )
        self._take_placement(rec.plan)
        return True

    # figures ---------------------------------------------------------------------------

    def request(self) -> LoadRequest:
        """Exactly what Apply sends to `/v1/engine/load`."""
        c = self.choices
        gpu = self.has_gpus and c.n_gpu_layers != 0
        all_experts = gpu and self.is_moe and c.n_cpu_moe >= self.n_layer
        fields: dict[str, Any] = {
            "model": str(self.model),
            "draft_model": self.draft_model,
            "runtime": self._runtime() if gpu else None,
            "n_ctx": c.n_ctx,
            "n_gpu_layers": c.n_gpu_layers if gpu else 0,
            "tensor_split": list(c.tensor_split) if gpu and c.tensor_split else None,
            "expert_offload": all_experts,
            "n_cpu_moe": c.n_cpu_moe if gpu and self.is_moe and not all_experts else 0,
            "type_k": c.type_k,
            "type_v": c.type_v,
            "flash_attn": c.flash_attn,
            "threads": c.threads,
            "n_parallel": c.n_parallel,
        }
        return LoadRequest.model_validate(fields)

    def estimated(self) -> MemoryBreakdown:
        """The estimator's figures for `request()`, as the planner computes them."""
        load = self.request()
        gpus = [
            Device(name, g.backend, g.free)
            for name, g in zip(self.names, self.hardware.gpus, strict=False)
        ]
        return estimate(
            self.shape,
            n_ctx=load.n_ctx,
            type_k=load.type_k,
            type_v=load.type_v,
            flash_attn=load.flash_attn != "off",
            n_gpu_layers=load.n_gpu_layers,
            gpus=gpus,
            tensor_split=load.tensor_split,
            expert_offload=load.expert_offload,
            n_cpu_moe=load.n_cpu_moe,
            n_ubatch=load.n_ubatch,
            host=Device("CPU", "cpu", self.hardware.ram.available),
            n_seq=load.n_parallel,
            kv_unified=load.kv_unified,
        )

    def wants_dry_run(self) -> LoadRequest | None:
        """The load to measure now, or None (a described machine, or already measured)."""
        if self.described:
            return None
        load = self.request()
        return None if load.model_dump_json() in self._measured else load

    def set_measured(self, load: LoadRequest, measured: MeasuredMemory) -> None:
        """A dry run's figures for `load` (kept; used while the settings equal it)."""
        self._measured[load.model_dump_json()] = measured
        self._measure_error = None

    def set_measure_failed(self, message: str) -> None:
        self._measure_error = message

    def view(self) -> WizardView:
        """The bars, the method, and what stands in the way, for the current state."""
        load = self.request()
        mem = self.estimated()
        method: Method = "estimated"
        measured = self._measured.get(load.model_dump_json())
        gpus_planned = sum(1 for d in mem.devices if d.name != "CPU" and d.total > 0)
        if self.described:
            note = "planned for the described machine; a dry run needs the hardware itself"
        elif measured is not None and len(measured.gpu_devices) < gpus_planned:
            note = "the llama.cpp build here does not see the planned GPUs, so no dry run"
        elif measured is not None:
            mem = measured_breakdown(mem, measured)
            method = "measured"
            note = "by a llama.cpp dry run on this machine"
        elif self._measure_error:
            note = f"the dry run failed: {self._measure_error}"
        else:
            note = "a dry run on this machine is measuring it…"
        bars = []
        for i, name in enumerate(self.names):
            d = mem.device(name)
            weights, kv, compute, total = (
                (d.weights, d.kv, d.compute, d.total) if d is not None else (0, 0, 0, 0)
            )
            bars.append(
                DeviceBar(
                    name=name,
                    title=self.title(i),
                    free=self.free(i),
                    budget=self.budgets[i],
                    weights=weights,
                    kv=kv,
                    compute=compute,
                    overhead=total - weights - kv - compute,
                )
            )
        problems, notes = self._check(load, bars)
        return WizardView(bars, method, note, problems, notes, self.choices, load)

    # inner workings --------------------------------------------------------------------

    def _candidate(self) -> ModelCandidate:
        return ModelCandidate(
            self.model.name, self.header, self.header.file_size or 0, str(self.model)
        )

    def _pins(self, **pinned: Any) -> Pins:
        return Pins(budget_bytes=tuple(self.budgets), headroom_bytes=self.headroom, **pinned)

    def _runtime(self) -> str | None:
        rec = self.recommendation()
        if rec.plan is not None and rec.plan.load.runtime:
            return rec.plan.load.runtime
        backends = {g.backend for g in self.hardware.gpus}
        found = next((r for r in self.hardware.runtimes if r.backend in backends), None)
        return found.name if found is not None else None

    def _place(self) -> None:
        """With auto placement, the planner places layers for the pinned settings."""
        self._placement_error = None
        c = self.choices
        if not c.auto_placement:
            self._paged = 0
            return
        if c.flash_attn == "off" and c.type_v not in FULL_PRECISION:
            self._placement_error = "a quantized V cache needs flash attention"
            return
        pins = self._pins(
            ctx=c.n_ctx,
            type_k=c.type_k,
            type_v=c.type_v,
            flash_attn="on" if c.flash_attn == "auto" else c.flash_attn,
            n_parallel=c.n_parallel,
        )
        try:
            placed = plan(self.hardware, [self._candidate()], pins)
        except PeregrineError as exc:
            self._placement_error = str(exc)
            return
        self._take_placement(placed)

    def _take_placement(self, placed: Plan) -> None:
        load = placed.load
        self._paged = placed.paged_bytes
        self.choices = replace(
            self.choices,
            n_gpu_layers=load.n_gpu_layers,
            n_cpu_moe=self.n_layer if load.expert_offload else load.n_cpu_moe,
            tensor_split=tuple(load.tensor_split) if load.tensor_split else None,
        )

    def _check(self, load: LoadRequest, bars: list[DeviceBar]) -> tuple[list[str], list[str]]:
        problems: list[str] = []
        notes: list[str] = []
        if load.flash_attn == "off" and load.type_v not in FULL_PRECISION:
            problems.append(
                f"A quantized V cache ({load.type_v}) needs flash attention: turn it on or use "
                "an f16 V cache."
            )
        for bar in bars:
            allowance = self._paged if bar.name == "CPU" else 0
            if bar.over > allowance:
                beyond_free = bar.used - allowance > bar.free
                problems.append(
                    f"{bar.title} needs {gib(bar.used)} but its budget is {gib(bar.budget)} "
                    f"({gib(bar.over - allowance)} over"
                    + (
                        f"; only {gib(bar.free)} is free, so loading would fail"
                        if beyond_free
                        else ""
                    )
                    + ")."
                )
        if problems and self._placement_error:
            problems.append(f"The planner finds no placement: {self._placement_error}.")
        if self._paged:
            notes.append(
                f"{gib(self._paged)} of MoE experts stay memory-mapped on disk: it loads, but "
                "generates more slowly."
            )
        if load.n_ctx > (self.shape.n_ctx_train or MAX_N_CTX):
            notes.append(f"The model was trained for {self.shape.n_ctx_train:,} tokens.")
        if not self.choices.auto_placement:
            notes.append("Placement set by hand: the planner does not move layers.")
        return problems, notes


def open_wizard(
    model: Path,
    hardware: Callable[[], Hardware],
    *,
    described: bool,
    draft_model: str | None = None,
) -> LoadWizard:
    """Reads the hardware and the model's header and builds a wizard (blocking: a background call)."""
    return LoadWizard.open(model, hardware(), described=described, draft_model=draft_model)
