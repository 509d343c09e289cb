"""A tiny glm4moe GGUF with one NextN (MTP) block and random weights.

The trunk is dense (every trunk layer is a "leading dense block"); the NextN
block after it is a small mixture of experts with a shared expert, because
llama.cpp's glm4moe MTP graph asserts `ffn_gate_inp` and calls the shared
expert. The vocabulary (tokens, merges, chat template) is the built-in
model's, so the engine's chat path works on it unchanged. About 13 MB.
Acceptance rates mean nothing with random weights: tests check the mechanics
(loading, drafting from hidden states, rollback, losslessness).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_TRUNK = 2
N_EMBD = 64


def _copy_vocab(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copies every tokenizer.* key of `source` into `writer`; returns the vocabulary size."""
    reader = gguf.GGUFReader(str(source))
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            if field.types[1] == gguf.GGUFValueType.STRING:
                items: list[object] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                items = [int(field.parts[i][0]) for i in field.data]
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(items)
            writer.add_array(key, items)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(key, field.contents())
        elif vtype == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, bool(field.contents()))
        else:
            writer.add_uint32(key, int(field.contents()))
    return n_vocab


def tiny_mtp_model(
    path: Path,
    vocab_from: Path,
    *,
    seed: int = 0,
    n_trunk: int = N_TRUNK,
    output_scale: float = 0.5,
) -> Path:
    """Writes the fixture to `path`: 64 embd, 4 heads / 2 KV heads of 16, 4 experts of 32.

    `output_scale` sets the spread of the logits (of the trunk and of the MTP
    head, which share the output matrix): the default makes greedy picks
    clear-cut; a small one makes every distribution nearly flat, so that a
    request's logit bias shapes the target's and the head's alike.
    """
    rng = np.random.default_rng(seed)
    n_embd, n_head, n_kv, hd, n_exp, n_ff = N_EMBD, 4, 2, 16, 4, 64
    n_ff_exp = 32
    arch = "glm4moe"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-mtp")
    # The NextN block counts among the blocks; nextn_predict_layers says how many.
    w.add_block_count(n_trunk + 1)
    w.add_uint32(f"{arch}.nextn_predict_layers", 1)
    w.add_uint32(f"{arch}.leading_dense_block_count", n_trunk)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    w.add_expert_shared_count(1)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(1.0)
    w.add_file_type(1)
    n_vocab = _copy_vocab(w, vocab_from)

    def t(name: str, *shape: int, scale: float = 0.08, f16: bool = False) -> None:
        # numpy order: the last dimension is ggml's first (the row length).
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, data.astype(np.float16) if f16 else data)

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    # Large logits make greedy choices clear-cut, so float noise can't flip them.
    t("token_embd.weight", n_vocab, n_embd, scale=0.5, f16=True)
    for i in range(n_trunk + 1):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        ones(f"blk.{i}.post_attention_norm.weight", n_embd)
        t(f"blk.{i}.attn_q.weight", n_head * hd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_kv * hd, n_embd)
        t(f"blk.{i}.attn_v.weight", n_kv * hd, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_head * hd)
        if i < n_trunk:
            t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
            t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
            t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
            continue
        t(f"blk.{i}.ffn_gate_inp.weight", n_exp, n_embd)
        w.add_tensor(f"blk.{i}.exp_probs_b.bias", np.zeros(n_exp, np.float32))
        t(f"blk.{i}.ffn_gate_exps.weight", n_exp, n_ff_exp, n_embd)
        t(f"blk.{i}.ffn_up_exps.weight", n_exp, n_ff_exp, n_embd)
        t(f"blk.{i}.ffn_down_exps.weight", n_exp, n_embd, n_ff_exp)
        t(f"blk.{i}.ffn_gate_shexp.weight", n_ff_exp, n_embd)
        t(f"blk.{i}.ffn_up_shexp.weight", n_ff_exp, n_embd)
        t(f"blk.{i}.ffn_down_shexp.weight", n_embd, n_ff_exp)
        t(f"blk.{i}.nextn.eh_proj.weight", n_embd, 2 * n_embd)
        ones(f"blk.{i}.nextn.enorm.weight", n_embd)
        ones(f"blk.{i}.nextn.hnorm.weight", n_embd)
        ones(f"blk.{i}.nextn.shared_head_norm.weight", n_embd)
    ones("output_norm.weight", n_embd)
    t("output.weight", n_vocab, n_embd, scale=output_scale, f16=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
