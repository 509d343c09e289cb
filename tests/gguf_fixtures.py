"""Builders for small GGUF byte strings, valid and hostile, for tests.

`make_gguf_bytes` writes a header-only (or zero-filled) GGUF by hand, so
other tests can build fixtures without real weights. The low-level pieces
(`gguf_string`, `kv`, `tensor_info`, ...) let hostile files say anything.

Run `python -m tests.gguf_fixtures` to regenerate the committed corpus in
tests/data/hostile/.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = range(8)
STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12

_FORMATS = {
    UINT8: "B",
    INT8: "b",
    UINT16: "H",
    INT16: "h",
    UINT32: "I",
    INT32: "i",
    FLOAT32: "f",
    BOOL: "?",
    UINT64: "Q",
    INT64: "q",
    FLOAT64: "d",
}

# Elements per block and bytes per block of the ggml types fixtures use most.
_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 30: (1, 2)}

HOSTILE_DIR = Path(__file__).parent / "data" / "hostile"


@dataclass(frozen=True)
class Typed:
    """A metadata value with an explicit GGUF type (for an array: its element type)."""

    value: Any
    vtype: int


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def _infer_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return UINT32
        if -(1 << 31) <= value < 1 << 31:
            return INT32
        return INT64 if value < 0 else UINT64
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str | bytes):
        return STRING
    if isinstance(value, list | tuple):
        return ARRAY
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def encode_value(value: Any, vtype: int | None = None) -> tuple[int, bytes]:
    """(type id, payload) of one metadata value; `vtype` forces the type."""
    if isinstance(value, Typed):
        return (
            encode_value(value.value, value.vtype)
            if not isinstance(value.value, list | tuple)
            else _encode_array(value.value, value.vtype)
        )
    vtype = _infer_type(value) if vtype is None else vtype
    if vtype == STRING:
        return STRING, gguf_string(value)
    if vtype == ARRAY:
        return _encode_array(value, None)
    return vtype, struct.pack("<" + _FORMATS[vtype], value)


def _encode_array(items: Sequence[Any], etype: int | None) -> tuple[int, bytes]:
    if etype is None:
        etype = _infer_type(items[0]) if items else INT32
        if etype in (UINT32, INT32) and any(not 0 <= i < 1 << 32 for i in items):
            etype = INT32 if all(-(1 << 31) <= i < 1 << 31 for i in items) else INT64
    body = b"".join(encode_value(item, etype)[1] for item in items)
    return ARRAY, u32(etype) + u64(len(items)) + body


def kv(key: str | bytes, value: Any, vtype: int | None = None) -> bytes:
    """One encoded metadata entry."""
    t, payload = encode_value(value, vtype)
    return gguf_string(key) + u32(t) + payload


def tensor_info(name: str | bytes, shape: Sequence[int], ggml_type: int, offset: int) -> bytes:
    """One encoded tensor info (shape in ggml order, each dim as a signed int64)."""
    dims = b"".join(struct.pack("<q", d) for d in shape)
    return gguf_string(name) + u32(len(shape)) + dims + u32(ggml_type) + u64(offset)


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    block, size = _BLOCKS[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def preamble(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + u32(version) + u64(n_tensors) + u64(n_kv)


def make_gguf_bytes(
    metadata: dict[str, Any],
    tensors: list[tuple[str, tuple[int, ...], int]],
    version: int = 3,
    with_data: bool = False,
) -> bytes:
    """A GGUF file as bytes: header, and with `with_data` zero-filled tensor data.

    Metadata types are inferred (int -> uint32 when it fits, float -> float32,
    list -> array); wrap a value in `Typed` to choose. Tensors are laid out
    in order, each aligned to general.alignment (default 32).
    """
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, Typed):
        alignment = alignment.value
    infos = []
    offset = 0
    for name, shape, ggml_type in tensors:
        infos.append(tensor_info(name, shape, ggml_type, offset))
        offset += -(-tensor_nbytes(shape, ggml_type) // alignment) * alignment
    out = bytearray(preamble(len(tensors), len(metadata), version))
    for key, value in metadata.items():
        out += kv(key, value)
    for info in infos:
        out += info
    if with_data and tensors:
        out += bytes(-len(out) % alignment)
        out += bytes(offset)
    return bytes(out)


def small_model_bytes(with_data: bool = True) -> bytes:
    """A tiny but complete llama-shaped GGUF (a few KB)."""
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.file_type": 3,
        "llama.context_length": 256,
        "llama.block_count": 1,
        "tokenizer.chat_template": "{{ messages }}",
        "tokenizer.ggml.tokens": ["<s>", "a", "b", "c"],
        "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0],
        "tokenizer.ggml.token_type": Typed([3, 1, 1, 1], INT32),
    }
    tensors = [
        ("token_embd.weight", (32, 4), 3),
        ("blk.0.attn_norm.weight", (32,), 0),
        ("blk.0.attn_q.weight", (32, 32), 3),
        ("output.weight", (32, 4), 8),
    ]
    return make_gguf_bytes(metadata, tensors, with_data=with_data)


def hostile_cases() -> dict[str, bytes]:
    """Named hostile files, each a few KB at most, each to be refused with a GGUFError."""
    good_kv = kv("general.architecture", "llama")
    one_tensor = tensor_info("w", (32,), 0, 0)
    valid = small_model_bytes(with_data=True)
    cases: dict[str, bytes] = {
        "empty.gguf": b"",
        "three_bytes.gguf": b"GGU",
        "text.gguf": b"This is not a model.\nJust some text, as a mistaken download.\n",
        "html.gguf": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "lfs_pointer.gguf": b"version https://git-lfs.github.com/spec/v1\noid sha256:"
        + b"0" * 64
        + b"\nsize 98362432\n",
        "wrong_magic.gguf": b"GGML" + valid[4:],
        "byteswapped_magic.gguf": b"FUGG" + valid[4:],
        "version_1.gguf": b"GGUF" + u32(1) + u32(0) + u32(0),
        "version_99.gguf": preamble(0, 0, version=99),
        "big_endian.gguf": b"GGUF" + struct.pack(">I", 3) + struct.pack(">Q", 0) * 2,
        "truncated_preamble.gguf": preamble(0, 1)[:15],
        "huge_kv_count.gguf": preamble(0, 1 << 62) + good_kv,
        "huge_tensor_count.gguf": preamble(1 << 60, 1) + good_kv,
        "max_counts.gguf": preamble((1 << 64) - 1, (1 << 64) - 1),
        "huge_key_length.gguf": preamble(0, 1) + u64(1 << 62) + b"general",
        "huge_string_length.gguf": preamble(0, 1)
        + gguf_string("general.name")
        + u32(STRING)
        + u64((1 << 64) - 1)
        + b"x" * 16,
        "huge_array_length.gguf": preamble(0, 1)
        + gguf_string("tokenizer.ggml.tokens")
        + u32(ARRAY)
        + u32(STRING)
        + u64(1 << 61)
        + gguf_string("a") * 4,
        "huge_numeric_array.gguf": preamble(0, 1)
        + gguf_string("tokenizer.ggml.scores")
        + u32(ARRAY)
        + u32(FLOAT32)
        + u64(1 << 40),
        "unknown_value_type.gguf": preamble(0, 1) + gguf_string("general.name") + u32(13) + u64(0),
        "unknown_array_type.gguf": preamble(0, 1)
        + gguf_string("x")
        + u32(ARRAY)
        + u32(77)
        + u64(1)
        + b"\0" * 8,
        "nested_arrays_too_deep.gguf": preamble(0, 1)
        + gguf_string("deep")
        + u32(ARRAY)
        + (u32(ARRAY) + u64(1)) * 40
        + u32(UINT8)
        + u64(1)
        + b"\0",
        "many_nested_arrays.gguf": preamble(0, 1)
        + gguf_string("wide")
        + u32(ARRAY)
        + u32(ARRAY)
        + u64(100_000)
        + (u32(UINT8) + u64(0)) * 300,
        "too_many_kv.gguf": preamble(0, (1 << 16) + 1) + good_kv,
        "too_many_tensors.gguf": preamble((1 << 16) + 1, 0) + one_tensor,
        "empty_key.gguf": preamble(0, 1) + kv("", 1),
        "huge_key.gguf": preamble(0, 1) + gguf_string("k" * 70_000)[:3000],
        "key_not_utf8.gguf": preamble(0, 1) + kv(b"general.\xff\xfe", 1),
        "duplicate_key.gguf": preamble(0, 2) + good_kv + good_kv,
        "alignment_not_power_of_2.gguf": preamble(1, 1) + kv("general.alignment", 48) + one_tensor,
        "alignment_zero.gguf": preamble(1, 1) + kv("general.alignment", 0) + one_tensor,
        "alignment_wrong_type.gguf": preamble(1, 1) + kv("general.alignment", "32") + one_tensor,
        "duplicate_tensor.gguf": preamble(2, 1)
        + good_kv
        + tensor_info("w", (32,), 0, 0)
        + tensor_info("w", (32,), 0, 128),
        "tensor_name_too_long.gguf": preamble(1, 1) + good_kv + tensor_info("t" * 64, (32,), 0, 0),
        "tensor_name_not_utf8.gguf": preamble(1, 1)
        + good_kv
        + tensor_info(b"blk.\xc3(", (32,), 0, 0),
        "too_many_dims.gguf": preamble(1, 1) + good_kv + tensor_info("w", (32, 1, 1, 1, 1), 0, 0),
        "huge_n_dims.gguf": preamble(1, 1) + good_kv + gguf_string("w") + u32(0xFFFFFFFF),
        "zero_dim.gguf": preamble(1, 1) + good_kv + tensor_info("w", (32, 0), 0, 0),
        "negative_dim.gguf": preamble(1, 1) + good_kv + tensor_info("w", (32, -4), 0, 0),
        "element_overflow.gguf": preamble(1, 1)
        + good_kv
        + tensor_info("w", (1 << 32, 1 << 32), 0, 0),
        "unknown_tensor_type.gguf": preamble(1, 1) + good_kv + tensor_info("w", (32,), 4, 0),
        "tensor_type_out_of_range.gguf": preamble(1, 1)
        + good_kv
        + tensor_info("w", (32,), 0xFFFFFFFF, 0),
        "row_not_block_multiple.gguf": preamble(1, 1) + good_kv + tensor_info("w", (33, 2), 2, 0),
        "misaligned_offset.gguf": preamble(1, 1) + good_kv + tensor_info("w", (32,), 0, 7),
        "offset_overflow.gguf": preamble(1, 1)
        + good_kv
        + tensor_info("w", (32,), 0, (1 << 64) - 32),
        "truncated_in_metadata.gguf": valid[:60],
        "truncated_in_tensor_infos.gguf": valid[: _tensor_infos_start(valid) + 10],
    }
    return cases


def layout_cases() -> dict[str, bytes]:
    """Files whose header parses but whose tensor data is missing, misplaced or overlapping."""
    header_only = small_model_bytes(with_data=False)
    full = small_model_bytes(with_data=True)
    good_kv = kv("general.architecture", "llama")
    overlap = preamble(2, 1) + good_kv
    overlap += tensor_info("a", (64,), 0, 0) + tensor_info("b", (64,), 0, 128)
    overlap += bytes(-len(overlap) % 32) + bytes(512)
    return {
        "data_missing.gguf": header_only,
        "data_truncated.gguf": full[:-48],
        "tensors_overlap.gguf": overlap,
    }


def _tensor_infos_start(data: bytes) -> int:
    """Offset of the first tensor name in `small_model_bytes()` (found by its text)."""
    return data.index(b"token_embd.weight") - 8


def write_hostile_corpus(directory: Path = HOSTILE_DIR) -> list[Path]:
    """Writes the hostile cases to `directory` and the layout cases to its layout/."""
    written = []
    for folder, cases in ((directory, hostile_cases()), (directory / "layout", layout_cases())):
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in cases.items():
            path = folder / name
            path.write_bytes(data)
            written.append(path)
    return written


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
TOKENS = ["<unk>", "<s>", "</s>", "a", *BYTE_TOKENS]


def tiny_model(path: Path, **changes: Any) -> Path:
    """A small llama-shaped GGUF with consistent layout; `changes` edit its metadata (None drops)."""
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.context_length": 256,
        "llama.block_count": 1,
        "llama.embedding_length": 32,
        "llama.attention.head_count": 4,
        "llama.feed_forward_length": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.chat_template": "{{ messages }}",
        "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0] + [0.0] * 256,
        "tokenizer.ggml.token_type": Typed([2, 3, 3, 1] + [6] * 256, INT32),
    }
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    tensors = [("token_embd.weight", (32, 4), 0), ("blk.0.attn_norm.weight", (32,), 0)]
    path.write_bytes(make_gguf_bytes(metadata, tensors, with_data=True))
    return path


if __name__ == "__main__":
    paths = write_hostile_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else HOSTILE_DIR)
    print(f"wrote {len(paths)} files, {sum(p.stat().st_size for p in paths):,} bytes in all")
