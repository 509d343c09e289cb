"""A tiny MoE GGUF with real (random) weights, small enough to load and run on a CPU."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.gguf_fixtures import TOKENS

N_LAYER = 4


def tiny_moe(path: Path, n_layer: int = N_LAYER, seed: int = 0) -> Path:
    """Qwen3-MoE-shaped: 64 embd, 4 heads / 2 KV heads of 16, 4 experts of 32 (2 used)."""
    rng = np.random.default_rng(seed)
    n_embd, n_head, n_kv, hd, n_exp, n_ff = 64, 4, 2, 16, 4, 32
    n_vocab = len(TOKENS)
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("tiny-moe")
    w.add_block_count(n_layer)
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(n_ff)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0, 0.0, 0.0, -1.0] + [0.0] * (n_vocab - 4))
    w.add_token_types([2, 3, 3, 1] + [6] * (n_vocab - 4))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name: str, *shape: int) -> None:
        # numpy order: the last dimension is ggml's first (the row length).
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(hd, np.float32))
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(hd, np.float32))
        t(f"blk.{i}.attn_q.weight", n_head * hd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_kv * hd, n_embd)
        t(f"blk.{i}.attn_v.weight", n_kv * hd, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * hd)
        t(f"blk.{i}.ffn_gate_inp.weight", n_exp, n_embd)
        t(f"blk.{i}.ffn_gate_exps.weight", n_exp, n_ff, n_embd)
        t(f"blk.{i}.ffn_up_exps.weight", n_exp, n_ff, n_embd)
        t(f"blk.{i}.ffn_down_exps.weight", n_exp, n_embd, n_ff)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    t("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
