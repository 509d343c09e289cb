"""GGUF fixtures in the shapes of real models, for planner tests.

Written with the `gguf` package's GGUFWriter: metadata and tensor infos only;
the data area is a sparse hole of the real size (or left out with
sparse=False), since the planner reads headers, never weights. Sizes follow the
real files closely: Llama-3.1-8B (dense, GQA), Qwen3-30B-A3B (MoE, 128
experts), Gemma-3-12B (5 sliding-window layers : 1 global, tied embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from engine.gguf.header import read_gguf_header
from engine.planning.planner import ModelCandidate

Q = gguf.GGMLQuantizationType

# quant name -> (general.file_type, main type, type of the "sensitive" tensors)
QUANTS: dict[str, tuple[int, Q, Q]] = {
    "Q8_0": (7, Q.Q8_0, Q.Q8_0),
    "Q6_K": (18, Q.Q6_K, Q.Q6_K),
    "Q5_K_M": (17, Q.Q5_K, Q.Q6_K),
    "Q4_K_M": (15, Q.Q4_K, Q.Q6_K),
    "Q3_K_M": (12, Q.Q3_K, Q.Q4_K),
    "Q2_K": (10, Q.Q2_K, Q.Q3_K),
}


def _nbytes(shape: Sequence[int], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


class _Writer:
    """Collects tensor infos (ggml order: row length first) and writes a header-only GGUF."""

    def __init__(self, path: Path, arch: str):
        self.w = gguf.GGUFWriter(str(path), arch)
        self.path = path
        # What llama.cpp needs to load the file at all (for no_alloc dry runs).
        self.w.add_layer_norm_rms_eps(1e-6)
        self.w.add_tokenizer_model("none")

    def tensor(self, name: str, shape: Sequence[int], qtype: Q) -> None:
        self.w.add_tensor_info(
            name,
            tuple(reversed(shape)),
            np.dtype(np.float32),
            _nbytes(shape, qtype),
            raw_dtype=qtype,
        )

    def close(self, sparse: bool = True) -> Path:
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        self.w.close()
        if sparse:
            # Extend to the real size as a sparse file (no disk blocks): the layout checks
            # of validate_gguf_file pass, and a no_alloc dry run never reads the zeros.
            header = read_gguf_header(self.path)
            end = max((t.offset + t.n_bytes for t in header.tensors), default=0)
            with self.path.open("r+b") as f:
                f.truncate(header.data_offset + end)
        return self.path


def llama8b_like(folder: Path, quant: str = "Q4_K_M", sparse: bool = True) -> Path:
    """Llama-3.1-8B-Instruct: 32 layers, 4096 embd, 32 heads / 8 KV heads, vocab 128256."""
    ftype, main, sens = QUANTS[quant]
    path = folder / f"Llama-3.1-8B-like-{quant}.gguf"
    w = _Writer(path, "llama")
    n_embd, n_ff, n_vocab, n_layer = 4096, 14336, 128256, 32
    w.w.add_block_count(n_layer)
    w.w.add_context_length(131072)
    w.w.add_embedding_length(n_embd)
    w.w.add_feed_forward_length(n_ff)
    w.w.add_head_count(32)
    w.w.add_head_count_kv(8)
    w.w.add_rope_dimension_count(128)
    w.w.add_vocab_size(n_vocab)
    w.w.add_file_type(ftype)
    w.tensor("token_embd.weight", (n_embd, n_vocab), main)
    for i in range(n_layer):
        w.tensor(f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.ffn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.attn_q.weight", (n_embd, 4096), main)
        w.tensor(f"blk.{i}.attn_k.weight", (n_embd, 1024), main)
        w.tensor(f"blk.{i}.attn_v.weight", (n_embd, 1024), sens)
        w.tensor(f"blk.{i}.attn_output.weight", (4096, n_embd), main)
        w.tensor(f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_up.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_down.weight", (n_ff, n_embd), sens)
    w.tensor("output_norm.weight", (n_embd,), Q.F32)
    w.tensor("output.weight", (n_embd, n_vocab), Q.Q6_K if main != Q.Q8_0 else Q.Q8_0)
    return w.close(sparse)


def llama70b_like(folder: Path, quant: str = "Q4_K_M", sparse: bool = True) -> Path:
    """Llama-3.1-70B-Instruct: 80 layers, 8192 embd, 64 heads / 8 KV heads, vocab 128256."""
    ftype, main, sens = QUANTS[quant]
    path = folder / f"Llama-3.1-70B-like-{quant}.gguf"
    w = _Writer(path, "llama")
    n_embd, n_ff, n_vocab, n_layer = 8192, 28672, 128256, 80
    w.w.add_block_count(n_layer)
    w.w.add_context_length(131072)
    w.w.add_embedding_length(n_embd)
    w.w.add_feed_forward_length(n_ff)
    w.w.add_head_count(64)
    w.w.add_head_count_kv(8)
    w.w.add_rope_dimension_count(128)
    w.w.add_vocab_size(n_vocab)
    w.w.add_file_type(ftype)
    w.tensor("token_embd.weight", (n_embd, n_vocab), main)
    for i in range(n_layer):
        w.tensor(f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.ffn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.attn_q.weight", (n_embd, 8192), main)
        w.tensor(f"blk.{i}.attn_k.weight", (n_embd, 1024), main)
        w.tensor(f"blk.{i}.attn_v.weight", (n_embd, 1024), sens)
        w.tensor(f"blk.{i}.attn_output.weight", (8192, n_embd), main)
        w.tensor(f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_up.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_down.weight", (n_ff, n_embd), sens)
    w.tensor("output_norm.weight", (n_embd,), Q.F32)
    w.tensor("output.weight", (n_embd, n_vocab), Q.Q6_K if main != Q.Q8_0 else Q.Q8_0)
    return w.close(sparse)


def qwen35moe_like(folder: Path, quant: str = "Q4_K_M", sparse: bool = True) -> Path:
    """A hybrid 35B-A3B (Qwen3.5-35B-A3B's shape): 40 layers, every 4th full attention
    (2 KV heads of 256), the rest gated delta-net; 256 experts of 512 (8 used) and a
    shared expert; 262144 tokens of trained context."""
    ftype, main, sens = QUANTS[quant]
    path = folder / f"Qwen3.5-35B-A3B-like-{quant}.gguf"
    w = _Writer(path, "qwen35moe")
    n_embd, n_vocab, n_layer, n_exp, n_ff_exp = 2048, 248320, 40, 256, 512
    w.w.add_block_count(n_layer)
    w.w.add_context_length(262144)
    w.w.add_embedding_length(n_embd)
    w.w.add_feed_forward_length(n_ff_exp)
    w.w.add_head_count(16)
    w.w.add_head_count_kv(2)
    w.w.add_key_length(256)
    w.w.add_value_length(256)
    w.w.add_full_attention_interval(4)
    w.w.add_ssm_conv_kernel(4)
    w.w.add_ssm_inner_size(4096)
    w.w.add_ssm_state_size(128)
    w.w.add_ssm_group_count(16)
    w.w.add_ssm_time_step_rank(32)
    w.w.add_expert_count(n_exp)
    w.w.add_expert_used_count(8)
    w.w.add_expert_feed_forward_length(n_ff_exp)
    w.w.add_vocab_size(n_vocab)
    w.w.add_file_type(ftype)
    w.tensor("token_embd.weight", (n_embd, n_vocab), main)
    for i in range(n_layer):
        w.tensor(f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.post_attention_norm.weight", (n_embd,), Q.F32)
        if (i + 1) % 4 == 0:
            w.tensor(f"blk.{i}.attn_q.weight", (n_embd, 8192), main)
            w.tensor(f"blk.{i}.attn_k.weight", (n_embd, 512), main)
            w.tensor(f"blk.{i}.attn_v.weight", (n_embd, 512), sens)
            w.tensor(f"blk.{i}.attn_output.weight", (4096, n_embd), main)
        else:
            w.tensor(f"blk.{i}.attn_qkv.weight", (n_embd, 8192), main)
            w.tensor(f"blk.{i}.attn_gate.weight", (n_embd, 4096), main)
            w.tensor(f"blk.{i}.ssm_ba.weight", (n_embd, 64), Q.F32)
            w.tensor(f"blk.{i}.ssm_conv1d.weight", (4, 8192), Q.F32)
            w.tensor(f"blk.{i}.ssm_out.weight", (4096, n_embd), sens)
        w.tensor(f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_exp), Q.F32)
        w.tensor(f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_exp), main)
        w.tensor(f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_exp), main)
        w.tensor(f"blk.{i}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_exp), sens)
        w.tensor(f"blk.{i}.ffn_gate_shexp.weight", (n_embd, n_ff_exp), main)
        w.tensor(f"blk.{i}.ffn_up_shexp.weight", (n_embd, n_ff_exp), main)
        w.tensor(f"blk.{i}.ffn_down_shexp.weight", (n_ff_exp, n_embd), sens)
    w.tensor("output_norm.weight", (n_embd,), Q.F32)
    w.tensor("output.weight", (n_embd, n_vocab), Q.Q6_K if main != Q.Q8_0 else Q.Q8_0)
    return w.close(sparse)


def qwen3moe_like(
    folder: Path, quant: str = "Q4_K_M", sparse: bool = True, n_ctx_train: int = 40960
) -> Path:
    """Qwen3-30B-A3B: 48 layers, 2048 embd, 32 heads / 4 KV heads of 128, 128 experts (8 used).

    `n_ctx_train` 262144 gives the 2507 release's 256k context.
    """
    ftype, main, sens = QUANTS[quant]
    suffix = "" if n_ctx_train == 40960 else f"-{n_ctx_train // 1024}k"
    path = folder / f"Qwen3-30B-A3B{suffix}-like-{quant}.gguf"
    w = _Writer(path, "qwen3moe")
    n_embd, n_vocab, n_layer, n_exp, n_ff_exp = 2048, 151936, 48, 128, 768
    w.w.add_block_count(n_layer)
    w.w.add_context_length(n_ctx_train)
    w.w.add_embedding_length(n_embd)
    w.w.add_feed_forward_length(6144)
    w.w.add_head_count(32)
    w.w.add_head_count_kv(4)
    w.w.add_key_length(128)
    w.w.add_value_length(128)
    w.w.add_expert_count(n_exp)
    w.w.add_expert_used_count(8)
    w.w.add_expert_feed_forward_length(n_ff_exp)
    w.w.add_vocab_size(n_vocab)
    w.w.add_file_type(ftype)
    w.tensor("token_embd.weight", (n_embd, n_vocab), main)
    for i in range(n_layer):
        w.tensor(f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.ffn_norm.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.attn_q_norm.weight", (128,), Q.F32)
        w.tensor(f"blk.{i}.attn_k_norm.weight", (128,), Q.F32)
        w.tensor(f"blk.{i}.attn_q.weight", (n_embd, 4096), main)
        w.tensor(f"blk.{i}.attn_k.weight", (n_embd, 512), main)
        w.tensor(f"blk.{i}.attn_v.weight", (n_embd, 512), sens)
        w.tensor(f"blk.{i}.attn_output.weight", (4096, n_embd), main)
        w.tensor(f"blk.{i}.ffn_gate_inp.weight", (n_embd, n_exp), Q.F32)
        w.tensor(f"blk.{i}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_exp), main)
        w.tensor(f"blk.{i}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_exp), main)
        w.tensor(f"blk.{i}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_exp), sens)
    w.tensor("output_norm.weight", (n_embd,), Q.F32)
    w.tensor("output.weight", (n_embd, n_vocab), Q.Q6_K if main != Q.Q8_0 else Q.Q8_0)
    return w.close(sparse)


def gemma3_like(folder: Path, quant: str = "Q4_K_M", sparse: bool = True) -> Path:
    """Gemma-3-12B: 48 layers, 3840 embd, 16 heads / 8 KV heads of 256, window 1024, tied output."""
    ftype, main, sens = QUANTS[quant]
    path = folder / f"Gemma-3-12B-like-{quant}.gguf"
    w = _Writer(path, "gemma3")
    n_embd, n_ff, n_vocab, n_layer = 3840, 15360, 262144, 48
    w.w.add_block_count(n_layer)
    w.w.add_context_length(131072)
    w.w.add_embedding_length(n_embd)
    w.w.add_feed_forward_length(n_ff)
    w.w.add_head_count(16)
    w.w.add_head_count_kv(8)
    w.w.add_key_length(256)
    w.w.add_value_length(256)
    w.w.add_sliding_window(1024)
    w.w.add_vocab_size(n_vocab)
    w.w.add_file_type(ftype)
    w.tensor("token_embd.weight", (n_embd, n_vocab), main)
    for i in range(n_layer):
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            w.tensor(f"blk.{i}.{norm}.weight", (n_embd,), Q.F32)
        w.tensor(f"blk.{i}.attn_q_norm.weight", (256,), Q.F32)
        w.tensor(f"blk.{i}.attn_k_norm.weight", (256,), Q.F32)
        w.tensor(f"blk.{i}.attn_q.weight", (n_embd, 4096), main)
        w.tensor(f"blk.{i}.attn_k.weight", (n_embd, 2048), main)
        w.tensor(f"blk.{i}.attn_v.weight", (n_embd, 2048), sens)
        w.tensor(f"blk.{i}.attn_output.weight", (4096, n_embd), main)
        w.tensor(f"blk.{i}.ffn_gate.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_up.weight", (n_embd, n_ff), main)
        w.tensor(f"blk.{i}.ffn_down.weight", (n_ff, n_embd), sens)
    w.tensor("output_norm.weight", (n_embd,), Q.F32)
    return w.close(sparse)


def header_bytes(path: Path) -> bytes:
    """Just the header of a fixture, as a hub would serve the start of the file."""
    with path.open("rb") as f:
        return f.read(read_gguf_header(path).data_offset)


def candidate(path: Path) -> ModelCandidate:
    """A planner candidate for a fixture; file_size is what the real file would be."""
    header = read_gguf_header(path)
    return ModelCandidate(
        file_name=path.name,
        header=header,
        file_size=header.data_offset + header.tensor_bytes,
        path=str(path),
    )


def quant_family(folder: Path, builder: object, quants: Sequence[str]) -> list[ModelCandidate]:
    """Several quant files of one model, as a hub repo would offer them."""
    assert callable(builder)
    return [candidate(builder(folder, q)) for q in quants]
