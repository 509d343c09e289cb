"""The estimator's formulas, the dry-run probe, and how close the two are on the real model."""

from __future__ import annotations

import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.errors import PeregrineError
from engine.gguf.header import read_gguf_header
from engine.planning.estimate import (
    MIB,
    Device,
    estimate,
    kv_bytes,
    layer_layout,
    shape_from_header,
)
from engine.planning.probe import measure, parse_log
from engine.wire.control import LoadRequest
from tests.planner_models import gemma3_like, llama8b_like, qwen3moe_like

GiB = 1 << 30


@pytest.mark.parametrize(
    ("n_ctx", "kv_type", "mib"),
    # llama.cpp's own figures for the default model (logged by a no_alloc load).
    [(2048, "f16", 45.00), (8192, "f16", 180.00), (8192, "q8_0", 95.62), (8192, "q4_0", 50.62)],
)
def test_kv_formula_matches_llama_cpp_figures(
    default_model: Path, n_ctx: int, kv_type: str, mib: float
) -> None:
    shape = shape_from_header(read_gguf_header(default_model))
    assert round(kv_bytes(shape, n_ctx, kv_type, kv_type) / MIB, 2) == mib


def test_default_model_shape(default_model: Path) -> None:
    header = read_gguf_header(default_model)
    shape = shape_from_header(header)
    assert (shape.n_layer, shape.n_embd, shape.n_head[0], shape.n_head_kv[0]) == (30, 576, 9, 3)
    assert (shape.head_dim_k, shape.n_vocab, shape.n_ctx_train) == (64, 49152, 8192)
    assert shape.weight_bytes == header.tensor_bytes
    assert shape.tied_embedding_bytes > 0  # no output.weight: the head reuses token_embd


@pytest.mark.parametrize(
    ("n_ctx", "kv_type"),
    [(1024, "f16"), (4096, "q8_0"), (8192, "q4_0")],
)
def test_estimate_is_close_to_the_dry_run(default_model: Path, n_ctx: int, kv_type: str) -> None:
    """Issue 5's accuracy bar: KV within 1%, compute within 10%, total within 5%."""
    shape = shape_from_header(read_gguf_header(default_model))
    est = estimate(shape, n_ctx=n_ctx, type_k=kv_type, type_v=kv_type, flash_attn=True)
    got = measure(
        LoadRequest(
            model=str(default_model),
            n_ctx=n_ctx,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn="on",
            n_gpu_layers=0,
        )
    )
    assert got.n_ctx == n_ctx
    assert got.layer_devices == ["CPU"] * 31
    assert abs(est.kv - got.kv_total) <= 0.01 * got.kv_total
    assert abs(est.compute - sum(got.compute.values())) <= 0.10 * sum(got.compute.values())
    assert abs(est.total - got.total) <= 0.05 * got.total
    assert est.weights == got.weights_total


def test_dry_run_without_flash_attention_measures_the_kq_matrix(default_model: Path) -> None:
    with_fa = measure(
        LoadRequest(model=str(default_model), n_ctx=8192, flash_attn="on", n_gpu_layers=0)
    )
    without = measure(
        LoadRequest(model=str(default_model), n_ctx=8192, flash_attn="off", n_gpu_layers=0)
    )
    assert without.compute["CPU"] > with_fa.compute["CPU"] * 1.4
    shape = shape_from_header(read_gguf_header(default_model))
    est = estimate(shape, n_ctx=8192, flash_attn=False)
    assert abs(est.compute - without.compute["CPU"]) <= 0.10 * without.compute["CPU"]


@pytest.mark.parametrize("build", [llama8b_like, qwen3moe_like, gemma3_like])
def test_estimate_matches_dry_runs_of_big_model_shapes(
    tmp_path: Path, build: Callable[..., Path]
) -> None:
    """A no_alloc dry run reads no weights, so sparse fixtures of 5-18 GB measure for real."""
    path = build(tmp_path)
    shape = shape_from_header(read_gguf_header(path))
    got = measure(LoadRequest(model=str(path), n_ctx=8192, flash_attn="on", n_gpu_layers=0))
    est = estimate(shape, n_ctx=8192, flash_attn=True)
    assert got.weights_total == est.weights
    assert abs(est.kv - got.kv_total) <= 0.01 * got.kv_total
    assert abs(est.compute - sum(got.compute.values())) <= 0.10 * sum(got.compute.values())
    assert abs(est.total - got.total) <= 0.05 * got.total


def test_parse_log_reads_llama_cpp_lines() -> None:
    log = (
        "load_tensors: layer   0 assigned to device CUDA0, is_swa = 0\n"
        "load_tensors: layer   1 assigned to device CPU, is_swa = 0\n"
        "load_tensors:        CUDA0 model buffer size =     0.00 MiB\n"
        "llama_context: n_ctx                 = 4096\n"
        "llama_context:  CUDA_Host  output buffer size =     0.19 MiB\n"
        "llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  1/1 seqs), K (f16):   90.00 MiB\n"
        "llama_kv_cache: size =   12.00 MiB (  1024 cells,   5 layers,  1/1 seqs), K (f16):    6.00 MiB\n"
        "sched_reserve:      CUDA0 compute buffer size =   258.50 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB\n"
    )
    m = parse_log(log)
    assert m.layer_devices == ["CUDA0", "CPU"]
    assert m.n_ctx == 4096
    assert m.kv_total == 192 * MIB
    assert m.compute == {"CUDA0": round(258.5 * MIB), "CPU": round(12.01 * MIB)}
    assert m.output == {"CPU": round(0.19 * MIB)}


def test_dry_run_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PeregrineError, match="model file not found"):
        measure(LoadRequest(model=str(tmp_path / "nope.gguf")))


def test_dry_run_of_a_header_only_file_fails_cleanly(tmp_path: Path) -> None:
    """llama.cpp refuses a file whose tensor data is missing; the parent reports it in one line."""
    path = llama8b_like(tmp_path, "Q4_K_M", sparse=False)
    with pytest.raises(PeregrineError, match="dry run failed") as info:
        measure(LoadRequest(model=str(path), n_ctx=512))
    assert "\n" not in str(info.value)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake_python"
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_hanging_dry_run_times_out(tmp_path: Path) -> None:
    python = _script(tmp_path, "import time\nwhile True: time.sleep(1)")
    with pytest.raises(PeregrineError, match="did not finish within"):
        measure(LoadRequest(model="x.gguf"), timeout_s=0.5, python=python)


def test_a_crashing_dry_run_is_reported_with_its_signal(tmp_path: Path) -> None:
    python = _script(
        tmp_path,
        "import os, signal, sys\nsys.stderr.write('GGML_ASSERT(buf) failed\\n')\nos.kill(os.getpid(), signal.SIGABRT)",
    )
    with pytest.raises(PeregrineError, match=r"crashed \(SIGABRT\): GGML_ASSERT\(buf\) failed"):
        measure(LoadRequest(model="x.gguf"), python=python)


def test_layer_layout_mirrors_llama_cpp() -> None:
    # n_gpu_layers counts the output head as a layer: 30 of 31 leaves layer 0 on the CPU.
    assert layer_layout(30, ["CUDA0"], 30, None).devices == ("CPU",) + ("CUDA0",) * 30
    assert layer_layout(30, ["CUDA0"], -1, None).devices == ("CUDA0",) * 31
    assert layer_layout(30, ["CUDA0"], 0, None).devices == ("CPU",) * 31
    assert layer_layout(4, ["CUDA0", "CUDA1"], -1, [1.0, 0.0]).devices == ("CUDA0",) * 5
    assert layer_layout(4, ["CUDA0", "CUDA1"], -1, [0.0, 1.0]).devices == ("CUDA1",) * 5
    split = layer_layout(9, ["CUDA0", "CUDA1"], -1, [0.6, 0.4]).devices
    assert split == ("CUDA0",) * 6 + ("CUDA1",) * 4


def test_sliding_window_layers_keep_only_the_window(tmp_path: Path) -> None:
    shape = shape_from_header(read_gguf_header(gemma3_like(tmp_path)))
    assert sum(shape.swa_layers) == 40 and not shape.swa_layers[5] and shape.swa_layers[0]
    per_cell = 8 * 256 * 2 * 2  # KV heads x (K + V) x f16
    global_layers = 8 * 131072 * per_cell
    local_layers = 40 * 1536 * per_cell  # window 1024 + ubatch 512, padded to 256
    windowed = kv_bytes(shape, 131072, "f16", "f16", n_ubatch=512, swa_full=False)
    assert windowed == global_layers + local_layers
    # The engine keeps llama.cpp's default, full-size SWA caches (prefix reuse, rollback).
    assert kv_bytes(shape, 131072, "f16", "f16") == 48 * 131072 * per_cell


def test_full_offload_puts_everything_but_the_embedding_on_the_gpu(tmp_path: Path) -> None:
    shape = shape_from_header(read_gguf_header(llama8b_like(tmp_path)))
    gpu = Device("CUDA0", "cuda", 24 * GiB)
    mem = estimate(shape, n_ctx=8192, n_gpu_layers=-1, gpus=[gpu])
    cuda, cpu = mem.device("CUDA0"), mem.device("CPU")
    assert cuda is not None and cpu is not None
    assert cpu.weights == shape.input_bytes
    assert cuda.weights == sum(shape.layer_bytes) + shape.output_bytes
    assert cuda.kv == kv_bytes(shape, 8192, "f16", "f16") and cpu.kv == 0
    assert mem.overhead > 300 * MIB  # the CUDA context is counted
    assert mem.total == sum(d.total for d in mem.devices)


def test_tied_head_is_copied_to_the_gpu(tmp_path: Path) -> None:
    shape = shape_from_header(read_gguf_header(gemma3_like(tmp_path)))
    gpu = Device("CUDA0", "cuda", 24 * GiB)
    mem = estimate(shape, n_ctx=4096, n_gpu_layers=-1, gpus=[gpu])
    cuda = mem.device("CUDA0")
    assert cuda is not None
    assert cuda.weights == sum(shape.layer_bytes) + shape.output_bytes + shape.tied_embedding_bytes


def test_expert_offload_moves_only_expert_tensors_to_ram(tmp_path: Path) -> None:
    shape = shape_from_header(read_gguf_header(qwen3moe_like(tmp_path)))
    assert shape.is_moe and shape.n_expert == 128
    gpu = Device("CUDA0", "cuda", 8 * GiB)
    on_gpu = estimate(shape, n_ctx=8192, n_gpu_layers=-1, gpus=[gpu])
    offload = estimate(shape, n_ctx=8192, n_gpu_layers=-1, gpus=[gpu], expert_offload=True)
    moved = sum(shape.expert_bytes)
    g0, g1 = on_gpu.device("CUDA0"), offload.device("CUDA0")
    c0, c1 = on_gpu.device("CPU"), offload.device("CPU")
    assert g0 and g1 and c0 and c1
    assert g0.weights - g1.weights == moved
    assert c1.weights - c0.weights == moved
    assert g1.kv == g0.kv  # attention (and its KV) stays on the GPU
    assert moved > 0.9 * shape.weight_bytes


def test_expert_offload_dry_run_applies_the_override(tmp_path: Path) -> None:
    """The override list reaches llama.cpp: every expert tensor is reassigned to the CPU."""
    path = qwen3moe_like(tmp_path)
    got = measure(LoadRequest(model=str(path), n_ctx=4096, n_gpu_layers=-1, expert_offload=True))
    assert got.overridden == 48 * 3
    plain = measure(LoadRequest(model=str(path), n_ctx=4096, n_gpu_layers=-1))
    assert plain.overridden == 0
    assert got.weights_total == plain.weights_total
