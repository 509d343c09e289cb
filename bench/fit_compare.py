"""Peregrine's plans beside an emulation of llama.cpp's `--fit` (common/fit.cpp).

    python -m bench.fit_compare

Prints the docs/planner.md table: an 8B, a 30B-A3B MoE and a 70B (full-size GGUF
headers with sparse data, tests/planner_models.py) on four described machines.

The emulation follows fit.cpp's steps with llama-server's defaults (trained context,
f16 KV cache, a 1 GiB margin per GPU, --fit-ctx 4096), using Peregrine's estimator
for the sizes fit.cpp would measure with its no-alloc dry runs:
1. everything on the GPUs at the trained context: done if every GPU keeps its margin;
2. otherwise shorten the context (down to 4096) until the GPUs' total fits; one GPU
   and it fits: done;
3. otherwise fill the GPUs back to front with whole layers (MoE: first with every
   expert in RAM; if those all fit, bring experts back to the GPUs front to back).
fit.cpp never changes the KV type or the quant and never looks at system RAM.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import PeregrineError
from engine.planning.estimate import GIB, layer_layout, shape_from_header
from engine.planning.hardware import CPU, GPU, RAM, Hardware
from engine.planning.planner import (
    ModelCandidate,
    Pins,
    _Config,
    _ctx_options,
    _make_context,
    _max_true,
    _Placement,
    _Search,
    plan,
)

FIT_MIN_CTX = 4096


def machine(gpus: list[float], ram_gib: float) -> Hardware:
    """GPUs with 0.4 GiB in use (a desktop), RAM 80% available."""
    return Hardware(
        gpus=[
            GPU(f"GPU {g:g} GB", "cuda", int(g * GIB), int((g - 0.4) * GIB), "8.6") for g in gpus
        ],
        cpu=CPU("CPU", 8, 16, ["avx2"]),
        ram=RAM(int(ram_gib * GIB), int(ram_gib * 0.8 * GIB)),
        disk_free=1 << 40,
    )


MACHINES = {
    "8 GB laptop (32 GB RAM)": machine([8], 32),
    "24 GB (64 GB RAM)": machine([24], 64),
    "24 + 12 GB (64 GB RAM)": machine([24, 12], 64),
    "CPU only (64 GB RAM)": machine([], 64),
}


@dataclass
class FitResult:
    n_ctx: int
    counts: tuple[int, ...]
    n_cpu_moe: int
    ram_read: int
    total_read: int
    host: int  # bytes in system RAM
    host_budget: int


def emulate_fit(hw: Hardware, cand: ModelCandidate) -> FitResult | None:
    shape = shape_from_header(cand.header)
    pins = Pins(type_k="f16", type_v="f16", min_ctx=FIT_MIN_CTX)
    ctx = _make_context(hw, pins, {cand.file_name: shape})
    trained = shape.n_ctx_train
    search = _Search(
        ctx=ctx,
        ordered=[cand],
        above_floor={cand.file_name},
        target=trained,
        min_ctx=FIT_MIN_CTX,
        pairs=[("f16", "f16")],
        max_offload=None,
        all_layers_pinned=False,
    )
    contexts = _ctx_options(FIT_MIN_CTX, trained)

    def costs(n_ctx: int):  # type: ignore[no-untyped-def]
        return ctx.costs(cand, "f16", "f16", n_ctx)

    def result(n_ctx: int, p: _Placement) -> FitResult:
        c = costs(n_ctx)
        return FitResult(
            n_ctx,
            p.counts,
            p.n_cpu_moe,
            c.ram_read(p.cpu_layers, p.out_on_cpu, p.n_cpu_moe),
            c.total_read,
            c.host(p.cpu_layers, p.out_on_cpu, p.n_cpu_moe),
            ctx.host_budget,
        )

    everything = tuple(range(len(ctx.gpus)))
    # llama.cpp's default split: proportional to each GPU's free memory.
    layout = layer_layout(shape.n_layer, [g.name for g in ctx.gpus], -1, [g.free for g in hw.gpus])
    default_counts = tuple(layout.devices.count(g.name) for g in ctx.gpus)

    def default_fits(n_ctx: int) -> bool:
        config = _Config(cand, "f16", "f16", n_ctx, default_counts, 0)
        return ctx.fits(ctx.evaluate(config)) or not ctx.overshoot(ctx.evaluate(config)).keys() - {
            "CPU"
        }

    if not ctx.gpus:  # fit.cpp only shortens the context to fit host memory
        i = _max_true(
            lambda i: costs(contexts[i]).host(shape.n_layer, True, 0) <= ctx.host_budget,
            len(contexts),
        )
        if i < 0:
            return None
        return result(contexts[i], _Placement((), shape.n_layer, True, 0, 0))
    # Steps 1 and 2: every layer and expert on the GPUs (default split), the context
    # shortened; fit.cpp checks only the GPUs here.
    i = _max_true(lambda i: default_fits(contexts[i]), len(contexts))
    n_ctx = contexts[i] if i >= 0 else FIT_MIN_CTX
    if i >= 0:
        return result(n_ctx, _Placement(default_counts, 0, False, 0, 0))
    c = costs(FIT_MIN_CTX)
    if shape.is_moe:
        # Step 3, MoE: dense-only layers first; when they all fit, experts come back.
        dense_only = search.fill(c, everything, shape.n_layer)
        if dense_only.all_on_gpu:
            p = search.all_on_gpu(c, everything, paged_ok=True)
            assert p is not None
            return result(n_ctx, p)
        return result(n_ctx, dense_only)
    return result(n_ctx, search.fill(c, everything, 0))


def _where(counts: tuple[int, ...], n_all: int, n_cpu_moe: int, n_layer: int) -> str:
    on_gpu = sum(counts)
    if not counts or on_gpu == 0:
        text = "CPU"
    elif on_gpu >= n_all:
        text = "all on GPU" + (
            f" ({'+'.join(str(n) for n in counts if n)})" if sum(1 for n in counts if n) > 1 else ""
        )
    else:
        text = f"{on_gpu}/{n_all} layers on GPU" + (
            f" ({'+'.join(str(n) for n in counts if n)})" if sum(1 for n in counts if n) > 1 else ""
        )
    if n_cpu_moe:
        text += (
            ", experts of " + ("all" if n_cpu_moe >= n_layer else str(n_cpu_moe)) + " layers in RAM"
        )
    return text


def main() -> int:
    from tests.planner_models import candidate, llama8b_like, llama70b_like, qwen3moe_like

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        models = {
            "Llama-3.1-8B Q4_K_M": candidate(llama8b_like(d)),
            "Qwen3-30B-A3B Q4_K_M": candidate(qwen3moe_like(d)),
            "Llama-3.1-70B Q4_K_M": candidate(llama70b_like(d)),
        }
        print("| Machine | Model | Peregrine | RAM read/token | llama.cpp --fit | RAM read/token |")
        print("|---|---|---|---|---|---|")
        for mname, hw in MACHINES.items():
            for name, cand in models.items():
                shape = shape_from_header(cand.header)
                n_all = shape.n_layer + 1
                try:
                    p = plan(hw, [cand])
                    load = p.load
                    counts = (
                        tuple(int(s) for s in load.tensor_split)
                        if load.tensor_split
                        else (
                            (n_all if load.n_gpu_layers == -1 else load.n_gpu_layers,)
                            if hw.gpus
                            else ()
                        )
                    )
                    ncm = shape.n_layer if load.expert_offload else load.n_cpu_moe
                    ours = (
                        f"{load.n_ctx // 1024}k {load.type_k}, "
                        + _where(counts, n_all, ncm, shape.n_layer)
                        + (", paged" if p.paged_bytes else "")
                    )
                    ram = "all" if not hw.gpus or load.n_gpu_layers == 0 else "0"
                    for r in p.reasons:
                        if r.startswith("per token "):
                            ram = r.removeprefix("per token ").split(" of weights")[0]
                except PeregrineError:
                    ours, ram = "does not fit", "-"
                fit = emulate_fit(hw, cand)
                if fit is None:
                    theirs, fit_ram = "does not fit", "-"
                else:
                    theirs = f"{fit.n_ctx // 1024}k f16, " + _where(
                        fit.counts, n_all, fit.n_cpu_moe, shape.n_layer
                    )
                    if fit.host > fit.host_budget:
                        theirs += (
                            f" (needs {fit.host / GIB:.0f} GiB RAM of {fit.host_budget / GIB:.0f})"
                        )
                    fit_ram = f"{fit.ram_read / GIB:.1f} GiB" if fit.counts else "all"
                print(f"| {mname} | {name} | {ours} | {ram} | {theirs} | {fit_ram} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
