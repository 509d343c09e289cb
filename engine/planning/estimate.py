"""Memory estimator: what llama.cpp will allocate for a GGUF, from its header alone.

Used for remote files (before download), with `--estimate-only`, and by the
planner to search; local plans are then checked by a dry run
(engine/planning/probe.py). The formulas follow llama.cpp 0c1e57098 (vendored by
llama-cpp-python 0.3.36): layer placement from llama-model.cpp, KV cells from
llama-context.cpp / llama-kv-cache-iswa.cpp, and a compute-buffer model fitted to
the buffer sizes llama.cpp logs (docs/planner.md has the accuracy table).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import PeregrineError
from engine.gguf.header import GGUFHeader
from engine.wire.base import KV_BYTES_PER_ELEMENT

MIB = 1024 * 1024
GIB = 1024 * MIB

# llama.cpp pads n_ctx, and the SWA cache, to 256 cells (llama-context.cpp).
CTX_PAD = 256

# Fixed cost of a GPU backend beyond its buffers: driver context, cuBLAS/hipBLAS
# workspaces, kernels. llama.cpp cannot report it; these are typical figures.
BACKEND_OVERHEAD: dict[str, int] = {
    "cuda": 320 * MIB,
    "hip": 320 * MIB,
    "sycl": 320 * MIB,
    "vulkan": 200 * MIB,
    "metal": 64 * MIB,
}
DEFAULT_BACKEND_OVERHEAD = 256 * MIB

# ggml device name prefixes, as llama.cpp names buffers ("CUDA0", "ROCm1", ...).
DEVICE_PREFIX: dict[str, str] = {
    "cuda": "CUDA",
    "hip": "ROCm",
    "vulkan": "Vulkan",
    "metal": "Metal",
    "sycl": "SYCL",
}

# Sliding-window layer patterns that llama.cpp hard-codes per architecture when
# the file has no `attention.sliding_window_pattern` (src/models/*.cpp):
# arch -> (n_pattern, dense_first).
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma-embedding": (6, False),
    "gemma3n": (5, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "llama4": (4, False),
    "exaone4": (4, False),
    "exaone-moe": (4, False),
    "olmo2": (4, False),
    "openai-moe": (2, False),
    "gpt-oss": (2, False),
    "smallthinker": (4, True),
    "plamo3": (8, False),
    "afmoe": (4, False),
}

# Architectures whose layers keep a recurrent state instead of (or beside) a KV cache.
RECURRENT_ARCHS = ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "lfm2")
HYBRID_ARCHS = (
    "jamba",
    "falcon-h1",
    "granitehybrid",
    "nemotron_h",
    "qwen3next",
    "qwen35",
    "qwen35moe",
)

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")

# Architectures whose MTP heads the engine runs (engine/backend/mtp.py): their
# MTP graph uses a plain KV cache that can roll back rejected drafts.
MTP_ARCHITECTURES = frozenset({"glm4moe"})


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that decide its memory, read from a GGUF header."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer; 0 for layers without a KV cache
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ff: int
    n_ctx_train: int
    swa_layers: tuple[bool, ...]
    n_swa: int
    recurrent_layers: tuple[bool, ...]
    recurrent_state_bytes: int  # per recurrent layer, f32
    mla_kv_dim: int  # >0: MLA (compressed latent K, V a view of it)
    layer_bytes: tuple[int, ...]  # all weights of each block
    expert_bytes: tuple[int, ...]  # the MoE expert tensors (ffn_*_exps) of each block
    input_bytes: int  # token embedding and other tensors kept on the host
    output_bytes: int  # output head + output norm
    tied_embedding_bytes: int  # >0 when the head reuses token_embd (copied to the output device)
    n_expert: int
    n_expert_used: int
    n_ff_expert: int
    notes: tuple[str, ...] = ()
    # The last `nextn_layers` blocks are MTP heads; `mtp`: the engine loads and
    # runs them (a second context: the NextN layer's KV and its own compute buffer).
    nextn_layers: int = 0
    mtp: bool = False

    @property
    def weight_bytes(self) -> int:
        return self.input_bytes + self.output_bytes + sum(self.layer_bytes)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and any(self.expert_bytes)


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    return default


def _per_layer(value: Any, n_layer: int, default: int) -> tuple[int, ...]:
    """A hyperparameter that is either one number or one number per layer."""
    if isinstance(value, list):
        nums = [_int(v, default) for v in value]
        if len(nums) < n_layer:
            nums += [nums[-1] if nums else default] * (n_layer - len(nums))
        return tuple(nums[:n_layer])
    return (_int(value, default),) * n_layer


def shape_from_header(header: GGUFHeader) -> ModelShape:
    """Reads a ModelShape; raises PeregrineError when the header lacks the basics."""
    arch = header.architecture
    if not arch:
        raise PeregrineError("the GGUF file has no general.architecture")
    n_layer = header.block_count
    n_embd = _int(header.arch_get("embedding_length"))
    if not n_layer or n_layer <= 0 or n_embd <= 0:
        raise PeregrineError(f"the GGUF file lacks {arch}.block_count or {arch}.embedding_length")
    notes: list[str] = []
    n_head = _per_layer(header.arch_get("attention.head_count"), n_layer, 0)
    max_head = max(n_head) or 1
    n_head_kv = _per_layer(header.arch_get("attention.head_count_kv", max_head), n_layer, max_head)
    head_dim_k = _int(header.arch_get("attention.key_length"), n_embd // max_head)
    head_dim_v = _int(header.arch_get("attention.value_length"), n_embd // max_head)

    tensors = {t.name: t for t in header.tensors}
    n_vocab = _int(header.arch_get("vocab_size"))
    if n_vocab <= 0:
        tokens = header.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and tokens:
            n_vocab = len(tokens)
        elif "token_embd.weight" in tensors and len(tensors["token_embd.weight"].shape) >= 2:
            n_vocab = tensors["token_embd.weight"].shape[1]
    n_ff_value = header.arch_get("feed_forward_length", 4 * n_embd)
    n_ff = max(_per_layer(n_ff_value, n_layer, 4 * n_embd))

    # Sliding-window attention.
    n_swa = _int(header.arch_get("attention.sliding_window"))
    swa_layers = (False,) * n_layer
    if n_swa > 0:
        pattern = header.arch_get("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa_layers = tuple(bool(v) for v in pattern[:n_layer]) + (False,) * max(
                0, n_layer - len(pattern)
            )
        else:
            n_pattern, dense_first = SWA_PATTERNS.get(arch, (0, False))
            if isinstance(pattern, int) and not isinstance(pattern, bool):
                n_pattern = pattern
            if n_pattern or arch in SWA_PATTERNS:
                swa_layers = tuple(_is_swa(il, n_pattern, dense_first) for il in range(n_layer))
            else:
                notes.append(
                    f"{arch}: sliding window without a known layer pattern; "
                    "all layers counted with the full context"
                )

    # Recurrent and hybrid layers.
    recurrent = (False,) * n_layer
    state_bytes = 0
    if arch in RECURRENT_ARCHS or arch in HYBRID_ARCHS or header.arch_get("ssm.state_size"):
        interval = _int(header.arch_get("full_attention_interval"))
        if arch in RECURRENT_ARCHS:
            recurrent = (True,) * n_layer
        elif interval > 0:
            recurrent = tuple((il + 1) % interval != 0 for il in range(n_layer))
        else:
            recurrent = tuple(h == 0 for h in n_head_kv)
        d_inner = _int(header.arch_get("ssm.inner_size"), 2 * n_embd)
        d_state = _int(header.arch_get("ssm.state_size"), 16)
        d_conv = _int(header.arch_get("ssm.conv_kernel"), 4)
        n_group = max(1, _int(header.arch_get("ssm.group_count"), 1))
        state_bytes = 4 * (d_inner * d_state + (d_conv - 1) * (d_inner + 2 * n_group * d_state))
        n_head_kv = tuple(0 if r else h for r, h in zip(recurrent, n_head_kv, strict=True))
        notes.append(
            f"{arch}: recurrent state estimated from ssm sizes ({state_bytes // 1024} KiB a layer)"
        )

    kv_lora = _int(header.arch_get("attention.kv_lora_rank"))
    mla_dim = 0
    if kv_lora > 0:
        mla_dim = kv_lora + _int(header.arch_get("rope.dimension_count"), 64)
        notes.append(
            f"{arch}: MLA cache counted as the compressed latent ({mla_dim} a token a layer)"
        )

    layer_bytes = [0] * n_layer
    expert_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    for t in header.tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            il = int(m.group(1))
            if il >= n_layer:  # MTP / nextn blocks are not loaded for plain inference
                continue
            layer_bytes[il] += t.n_bytes
            if "_exps." in t.name or t.name.endswith("_exps"):
                expert_bytes[il] += t.n_bytes
        elif t.name.startswith("output"):
            output_bytes += t.n_bytes
        else:
            input_bytes += t.n_bytes
    tied = 0
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        tied = tensors["token_embd.weight"].n_bytes

    n_expert = _int(header.arch_get("expert_count"))
    n_expert_used = _int(header.arch_get("expert_used_count"))
    n_ff_expert = _int(header.arch_get("expert_feed_forward_length"))
    nextn = min(max(header.nextn_layers, 0), n_layer - 1)
    return ModelShape(
        nextn_layers=nextn,
        mtp=nextn > 0 and arch in MTP_ARCHITECTURES,
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=max(1, n_vocab),
        n_ff=n_ff,
        n_ctx_train=header.context_length or 4096,
        swa_layers=swa_layers,
        n_swa=n_swa,
        recurrent_layers=recurrent,
        recurrent_state_bytes=state_bytes,
        mla_kv_dim=mla_dim,
        layer_bytes=tuple(layer_bytes),
        expert_bytes=tuple(expert_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_embedding_bytes=tied,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_expert=n_ff_expert,
        notes=tuple(notes),
    )


def _is_swa(il: int, n_pattern: int, dense_first: bool) -> bool:
    """llama_hparams::set_swa_pattern."""
    if n_pattern == 0:
        return True
    if dense_first:
        return il % n_pattern != 0
    return il % n_pattern < n_pattern - 1


@dataclass(frozen=True)
class Device:
    """A place memory can go: "CPU" or a GPU (named as llama.cpp names it)."""

    name: str
    backend: str  # "cpu" for the host
    free: int


@dataclass
class DeviceMemory:
    """One device's share of a plan (docs/api.md `memory.devices[]`)."""

    name: str
    weights: int = 0
    kv: int = 0
    compute: int = 0
    total: int = 0
    free: int = 0


@dataclass
class MemoryBreakdown:
    """Memory of one load, in bytes; `total` includes `overhead`."""

    weights: int
    kv: int
    compute: int
    overhead: int
    total: int
    devices: list[DeviceMemory] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def device(self, name: str) -> DeviceMemory | None:
        return next((d for d in self.devices if d.name == name), None)


@dataclass(frozen=True)
class Layout:
    """Where llama.cpp puts each layer (0..n_layer-1) and the output head (index n_layer)."""

    devices: tuple[str, ...]


def pad(n: int, to: int = CTX_PAD) -> int:
    return (n + to - 1) // to * to


def layer_layout(
    n_layer: int,
    gpu_names: Sequence[str],
    n_gpu_layers: int,
    tensor_split: Sequence[float] | None,
) -> Layout:
    """Mirrors llama_model::load_tensors' placement of layers on devices."""
    n_all = n_layer
    if not gpu_names or n_gpu_layers == 0:
        return Layout(("CPU",) * (n_all + 1))
    ngl = n_all + 1 if n_gpu_layers < 0 else n_gpu_layers
    split = list(tensor_split or [1.0] * len(gpu_names))[: len(gpu_names)]
    split += [0.0] * (len(gpu_names) - len(split))
    if sum(split) <= 0:
        split = [1.0] * len(gpu_names)
    cumulative, running = [], 0.0
    for s in split:
        running += s
        cumulative.append(running)
    cumulative = [c / running for c in cumulative]
    start = max(n_all + 1 - ngl, 0)
    act = min(ngl, n_all + 1)
    out = []
    for il in range(n_all + 1):
        if il < start or il - start >= act:
            out.append("CPU")
        else:
            idx = bisect.bisect_right(cumulative, (il - start) / act)
            out.append(gpu_names[min(idx, len(gpu_names) - 1)])
    return Layout(tuple(out))


def kv_cells(
    shape: ModelShape,
    n_ctx: int,
    n_ubatch: int,
    il: int,
    swa_full: bool = True,
    n_seq: int = 1,
    kv_unified: bool = True,
) -> int:
    """KV cells of layer il: the padded context, or the (padded) window for SWA layers.

    `swa_full` is llama_context_default_params()' default, which the engine keeps:
    full-size SWA caches allow prefix reuse and speculative rollback. With
    parallel slots (`n_seq`) a unified cache keeps n_ctx cells in all; separate
    caches get n_ctx / n_seq each, padded to 256 as llama.cpp does.
    """
    if n_seq > 1 and not kv_unified:
        cells = max(256, -(-(n_ctx // n_seq) // 256) * 256) * n_seq
    else:
        cells = pad(n_ctx)
    if not swa_full and shape.swa_layers[il] and shape.n_swa > 0:
        return min(cells, pad(shape.n_swa + n_ubatch))
    return cells


def kv_layer_bytes(
    shape: ModelShape,
    il: int,
    n_ctx: int,
    type_k: str,
    type_v: str,
    n_ubatch: int,
    swa_full: bool = True,
    n_seq: int = 1,
    kv_unified: bool = True,
) -> int:
    """KV (or recurrent-state) bytes of one layer; a recurrent state per slot (`n_seq`)."""
    if il >= shape.n_layer - shape.nextn_layers and not shape.mtp:
        return 0  # an MTP head keeps a KV cache only in the MTP context
    if shape.recurrent_layers[il]:
        return shape.recurrent_state_bytes * max(1, n_seq)
    cells = kv_cells(shape, n_ctx, n_ubatch, il, swa_full, n_seq, kv_unified)
    if shape.mla_kv_dim:
        return int(cells * shape.mla_kv_dim * KV_BYTES_PER_ELEMENT[type_k])
    n_kv = shape.n_head_kv[il]
    k = int(cells * n_kv * shape.head_dim_k * KV_BYTES_PER_ELEMENT[type_k])
    v = int(cells * n_kv * shape.head_dim_v * KV_BYTES_PER_ELEMENT[type_v])
    return k + v


def kv_bytes(
    shape: ModelShape,
    n_ctx: int,
    type_k: str,
    type_v: str,
    n_ubatch: int = 512,
    swa_full: bool = True,
) -> int:
    """Whole-model KV cache bytes (llama.cpp's `llama_kv_cache: size = ...`)."""
    return sum(
        kv_layer_bytes(shape, il, n_ctx, type_k, type_v, n_ubatch, swa_full)
        for il in range(shape.n_layer)
    )


def compute_bytes(
    shape: ModelShape,
    n_ctx: int,
    n_ubatch: int,
    flash_attn: bool,
    quantized_kv: bool,
    *,
    has_output: bool = True,
    has_layers: bool = True,
) -> int:
    """One device's compute buffer: the peak of the graph's phases, fitted to llama.cpp's log.

    The logits phase (n_vocab x n_ubatch f32) dominates small models; without
    flash attention the KQ matrix (n_ctx x n_ubatch x n_head f32) can exceed it.
    """
    ub = n_ubatch
    embd = ub * shape.n_embd * 4
    phases = [2 * embd]
    if has_output:
        phases.append(
            shape.n_vocab * ub * 4 + 2 * embd + (embd if flash_attn and quantized_kv else 0)
        )
    if has_layers:
        n_kv = pad(n_ctx)
        n_head = max(shape.n_head) or 1
        if not flash_attn:
            phases.append(n_kv * ub * (n_head + 1) * 4)
        ff = shape.n_ff
        if shape.n_expert_used and shape.n_ff_expert:
            ff = shape.n_expert_used * shape.n_ff_expert
        phases.append(ub * (3 * ff + 2 * shape.n_embd) * 4)
    return max(phases)


def mtp_compute_bytes(
    shape: ModelShape, n_ctx: int, n_ubatch: int, flash_attn: bool, quantized_kv: bool
) -> int:
    """The MTP context's compute buffer (one NextN layer and the output head), 0 without one.

    It sits on the output head's device, beside the target's own buffer.
    """
    if not shape.mtp:
        return 0
    return compute_bytes(shape, n_ctx, n_ubatch, flash_attn, quantized_kv)


def estimate(
    shape: ModelShape,
    *,
    n_ctx: int,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_gpu_layers: int = 0,
    gpus: Sequence[Device] = (),
    tensor_split: Sequence[float] | None = None,
    expert_offload: bool = False,
    n_ubatch: int = 512,
    host: Device | None = None,
    swa_full: bool = True,
    n_cpu_moe: int = 0,
    n_seq: int = 1,
    kv_unified: bool = True,
) -> MemoryBreakdown:
    """Estimates a load's memory per device (weights, KV, compute, overhead).

    `expert_offload` keeps every layer's MoE experts in system RAM; `n_cpu_moe`
    only those of the first n layers (llama-server's --cpu-moe / --n-cpu-moe).
    """
    n_cpu_moe = shape.n_layer if expert_offload else max(0, n_cpu_moe)
    experts_on_host = n_cpu_moe > 0 and shape.is_moe
    gpu_names = [g.name for g in gpus]
    layout = layer_layout(shape.n_layer, gpu_names, n_gpu_layers, tensor_split)
    host = host or Device("CPU", "cpu", 0)
    per: dict[str, DeviceMemory] = {host.name: DeviceMemory(name=host.name, free=host.free)}
    for g in gpus:
        per[g.name] = DeviceMemory(name=g.name, free=g.free)
    overhead: dict[str, int] = dict.fromkeys(per, 0)

    def dev(name: str) -> DeviceMemory:
        return per[host.name if name == "CPU" else name]

    dev("CPU").weights += shape.input_bytes
    quantized = type_k not in ("f16", "f32", "bf16") or type_v not in ("f16", "f32", "bf16")
    for il in range(shape.n_layer):
        d = dev(layout.devices[il])
        moved = shape.expert_bytes[il] if il < n_cpu_moe and layout.devices[il] != "CPU" else 0
        d.weights += shape.layer_bytes[il] - moved
        dev("CPU").weights += moved
        d.kv += kv_layer_bytes(
            shape, il, n_ctx, type_k, type_v, n_ubatch, swa_full, n_seq, kv_unified
        )
    out_dev = layout.devices[shape.n_layer]
    dev(out_dev).weights += shape.output_bytes
    if shape.tied_embedding_bytes and out_dev != "CPU":
        dev(out_dev).weights += shape.tied_embedding_bytes  # llama.cpp duplicates token_embd
    layer_devices = set(layout.devices[: shape.n_layer])
    for name, d in per.items():
        key = "CPU" if name == host.name else name
        has_layers = key in layer_devices
        has_output = key == out_dev
        if key == "CPU" and not has_layers and not has_output:
            # Fully offloaded: the host keeps only the embedding lookup's small buffer.
            d.compute = 2 * n_ubatch * shape.n_embd * 4
        elif has_layers or has_output:
            d.compute = compute_bytes(
                shape,
                n_ctx,
                n_ubatch,
                flash_attn,
                quantized,
                has_output=has_output,
                has_layers=has_layers or (key == "CPU" and experts_on_host),
            )
    dev(out_dev).compute += mtp_compute_bytes(shape, n_ctx, n_ubatch, flash_attn, quantized)
    # The host's output buffer holds one row of logits and embeddings (llama-context.cpp).
    overhead[host.name] += (shape.n_vocab + shape.n_embd) * 4
    for g in gpus:
        if g.name in layer_devices or g.name == out_dev:
            overhead[g.name] += BACKEND_OVERHEAD.get(g.backend, DEFAULT_BACKEND_OVERHEAD)
    devices = []
    for name, d in per.items():
        d.total = d.weights + d.kv + d.compute + overhead[name]
        devices.append(d)
    return MemoryBreakdown(
        weights=sum(d.weights for d in devices),
        kv=sum(d.kv for d in devices),
        compute=sum(d.compute for d in devices),
        overhead=sum(overhead.values()),
        total=sum(d.total for d in devices),
        devices=devices,
    )
