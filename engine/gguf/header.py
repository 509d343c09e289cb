"""Safe, streaming reader for GGUF headers (metadata and tensor infos).

Used to validate every model file before llama.cpp sees it (a llama.cpp
assert kills the whole process), by the memory planner, and by the model
manager to read a remote file's header with HTTP Range requests before
downloading it. Tensor data is never read, and hostile input is refused with
a one-line `GGUFError` within bounded time and memory: every count and
length is checked against the bytes that can still follow before anything
is allocated. See docs/gguf-header.md.
"""

from __future__ import annotations

import codecs
import collections
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx2 as httpx

from engine.errors import PeregrineError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of 64 bytes or more
MAX_ARRAY_DEPTH = 4  # llama.cpp reads no nested arrays at all; the gguf package writes them
# Counts parsed one by one in Python, capped so that hostile files are refused
# in well under a second. Real models have hundreds of keys and a few thousand
# tensors; nested arrays are rare (llama.cpp cannot read them).
MAX_METADATA_ENTRIES = 1 << 16
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16  # keys are names; real ones are under 100 bytes
MAX_NESTED_ARRAYS = 1 << 16  # inner arrays in the whole header
# Bounds llama.cpp asserts on while loading hyperparameters (llama-hparams.h and
# llama_model::load_hparams of the vendored llama.cpp): a GGML_ASSERT aborts the
# whole process, so values past them must never reach it.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# A trained context beyond this is nonsense (the longest real GGUF, Llama-4-Scout,
# says 10,485,760), and the planner would plan a context the engine cannot load.
MAX_CONTEXT_LENGTH = 1 << 24
ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})
# Rough CPython cost of the parsed metadata. The header cap alone does not
# bound memory: a 10-byte string on disk becomes a ~60-byte str object.
DEFAULT_MAX_METADATA_MEMORY = 64 << 20

# ggml type id -> (name, elements per block, bytes per block), from ggml.h and
# ggml.c's type_traits of the llama.cpp vendored by llama-cpp-python 0.3.36.
# Gaps (4, 5, 31-33, 36-38) are types removed from GGUF files.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# general.file_type -> quantization name, from llama.h's enum llama_ftype.
LLAMA_FTYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
    41: "Q2_0",
}
LLAMA_FTYPE_GUESSED = 1024

# GGUF metadata value types: id -> (name, struct format or None, size in bytes).
_T_STRING = 8
_T_ARRAY = 9
_VALUE_TYPES: dict[int, tuple[str, str | None, int]] = {
    0: ("uint8", "B", 1),
    1: ("int8", "b", 1),
    2: ("uint16", "H", 2),
    3: ("int16", "h", 2),
    4: ("uint32", "I", 4),
    5: ("int32", "i", 4),
    6: ("float32", "f", 4),
    7: ("bool", "?", 1),
    _T_STRING: ("string", None, 8),  # size: the length prefix, the least a string takes
    _T_ARRAY: ("array", None, 12),  # element type + count
    10: ("uint64", "Q", 8),
    11: ("int64", "q", 8),
    12: ("float64", "d", 8),
}
_T_UINT32 = 4
# Estimated CPython bytes per parsed element (list slot + object), see above.
_NUMBER_COST = 40
_STRING_COST = 64

_INT63 = 1 << 63
_U64 = struct.Struct("<Q")


class GGUFError(PeregrineError):
    """A file (or remote resource) is not a GGUF this program can use.

    The message is one line saying what is wrong and where (byte offset).
    `status` holds the HTTP status when a remote read was refused.
    """

    def __init__(self, message: str, *, offset: int | None = None, status: int | None = None):
        message = " ".join(message.split())  # one line, whatever the file contained
        super().__init__(message)
        self.offset = offset
        self.status = status


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header; `offset` is relative to the data start."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name, such as "Q4_K"."""
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        """Number of elements (1 for a zero-dimensional tensor)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    """Everything a GGUF file says before its tensor data."""

    version: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    alignment: int
    data_offset: int  # absolute byte offset where tensor data starts
    header_size: int  # bytes read to parse metadata and tensor infos
    file_size: int | None

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or `default` when the key is missing."""
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """The architecture-specific value `{architecture}.{suffix}`."""
        arch = self.architecture
        if arch is None:
            return default
        return self.metadata.get(f"{arch}.{suffix}", default)

    def _str(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def _int(self, value: Any) -> int | None:
        # bool is an int subclass, but a bool where a count belongs is not a count
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def architecture(self) -> str | None:
        """general.architecture, such as "llama"."""
        return self._str("general.architecture")

    @property
    def name(self) -> str | None:
        """general.name, the model's display name."""
        return self._str("general.name")

    @property
    def chat_template(self) -> str | None:
        """tokenizer.chat_template (Jinja), when the file has one."""
        return self._str("tokenizer.chat_template")

    @property
    def context_length(self) -> int | None:
        """The trained context length (None when missing, 0 or over MAX_CONTEXT_LENGTH)."""
        n = self._int(self.arch_get("context_length"))
        # Remote headers are planned without validate_gguf_file: keep absurd values out.
        return n if n is not None and 0 < n <= MAX_CONTEXT_LENGTH else None

    @property
    def block_count(self) -> int | None:
        """Number of transformer blocks (None when missing or outside 1..512)."""
        n = self._int(self.arch_get("block_count"))
        return n if n is not None and 0 < n <= LLAMA_MAX_LAYERS else None

    @property
    def nextn_layers(self) -> int:
        """Number of multi-token-prediction (MTP) blocks; 0 when none."""
        return self._int(self.arch_get("nextn_predict_layers")) or 0

    @property
    def n_params(self) -> int:
        """Total number of weights (elements of all tensors)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Total bytes of tensor data, without alignment padding."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def file_type(self) -> int | None:
        """general.file_type (a llama_ftype value)."""
        return self._int(self.metadata.get("general.file_type"))

    @property
    def quant_name(self) -> str | None:
        """The quantization's name, such as "Q4_K_M".

        From general.file_type when it names a known type, else the type
        holding most elements of the 2-D+ weight tensors.
        """
        ftype = self.file_type
        if ftype is not None:
            name = LLAMA_FTYPE_NAMES.get(ftype & ~LLAMA_FTYPE_GUESSED)
            if name is not None:
                return name
        counts: collections.Counter[int] = collections.Counter()
        for t in self.tensors:
            if t.name.endswith(".weight") and len(t.shape) >= 2:
                counts[t.ggml_type] += t.n_elements
        if not counts:
            counts.update({t.ggml_type: t.n_elements for t in self.tensors})
        if not counts:
            return None
        return GGML_TYPES[counts.most_common(1)[0][0]][0]


def _show(text: str, limit: int = 60) -> str:
    """A file-supplied string made safe for a one-line message."""
    shown = repr(text[:limit])
    return shown + "…" if len(text) > limit else shown


def _describe_start(data: bytes) -> str:
    """Why these first bytes are not a GGUF file, in the user's terms."""
    if data.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer file, not the model itself"
    if data.startswith(b"FUGG"):
        return "it looks like a byte-swapped (big-endian) GGUF, which is not supported"
    if data.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "it is an HTML page"
    if data.lstrip().startswith((b"{", b"[")):
        return "it looks like JSON text"
    try:
        # incremental: a character cut off at the end of the sample is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data)
    except UnicodeDecodeError:
        return f"it starts with bytes {data[:4].hex(' ')}, expected 'GGUF'"
    if all(c.isprintable() or c.isspace() for c in text):
        return "it looks like a text file"
    return f"it starts with bytes {data[:4].hex(' ')}, expected 'GGUF'"


class _Reader:
    """Bounded, buffered cursor over a `read(n) -> bytes` source.

    Knows how many bytes may still follow (file size and header cap), so
    every length can be checked before anything is allocated.
    """

    CHUNK = 1 << 16

    def __init__(self, read: Callable[[int], bytes], file_size: int | None, cap: int):
        self._read = read
        self._buf = bytearray()
        self._start = 0  # absolute offset of _buf[0]
        self._pos = 0  # absolute offset of the cursor
        self._eof = False
        self.file_size = file_size
        self.cap = cap

    @property
    def pos(self) -> int:
        return self._pos

    def remaining(self) -> int:
        """Most bytes that can still be read: up to the file's end and the header cap."""
        limit = self.cap
        if self.file_size is not None:
            limit = min(limit, self.file_size)
        return max(0, limit - self._pos)

    def fail(self, message: str, offset: int | None = None) -> GGUFError:
        at = self._pos if offset is None else offset
        return GGUFError(f"{message} (at byte {at})", offset=at)

    def _fill(self, n: int, what: str) -> None:
        """Makes `n` bytes available at the cursor, or raises a clear error."""
        have = self._start + len(self._buf) - self._pos
        if have >= n:
            return
        end = self._pos + n
        if end > self.cap and (self.file_size is None or end <= self.file_size):
            raise self.fail(
                f"the GGUF header is larger than the {self.cap:,}-byte limit while reading {what}"
            )
        if self.file_size is not None and end > self.file_size:
            raise self.fail(f"the file is truncated: {what} needs {n:,} bytes, past its end")
        # drop consumed bytes so the buffer stays about one chunk long
        consumed = self._pos - self._start
        if consumed:
            del self._buf[:consumed]
            self._start = self._pos
        self._pull(n)
        if len(self._buf) < n:
            raise self.fail(f"the file is truncated: {what} needs {n:,} bytes, past its end")

    def _pull(self, n: int) -> None:
        """Reads until the buffer holds `n` bytes or the source ends."""
        while len(self._buf) < n and not self._eof:
            end = self._start + len(self._buf)
            limit = self.cap - end
            if self.file_size is not None:
                limit = min(limit, self.file_size - end)
            # read ahead a chunk, but never past the file's end or the header cap
            want = min(max(n - len(self._buf), self.CHUNK), max(limit, n - len(self._buf)))
            data = self._read(want)
            if not data:
                self._eof = True
            else:
                # a source may not hand back more than asked for; keep the bound honest
                self._buf += data[:want]

    def peek(self, n: int) -> bytes:
        """Up to `n` bytes at the cursor, fewer only at the end of the source."""
        consumed = self._pos - self._start
        if consumed:
            del self._buf[:consumed]
            self._start = self._pos
        self._pull(n)
        return bytes(self._buf[:n])

    def skip(self, n: int) -> None:
        self._fill(n, "the start")
        self._pos += n

    def take(self, n: int, what: str) -> bytes:
        """The next `n` bytes."""
        self._fill(n, what)
        i = self._pos - self._start
        self._pos += n
        return bytes(self._buf[i : i + n])

    def take_text(self, n: int, what: str) -> str:
        """The next `n` bytes as text, invalid UTF-8 replaced (no intermediate copy)."""
        self._fill(n, what)
        i = self._pos - self._start
        self._pos += n
        with memoryview(self._buf) as view:
            # values are shown, not matched: replacement characters lose nothing important
            return str(view[i : i + n], "utf-8", errors="replace")

    def unpack_array(self, fmt: str, count: int, size: int, what: str) -> list[Any]:
        """The next `count` numbers of struct format `fmt`, as a list."""
        self._fill(count * size, what)
        values = struct.unpack_from(f"<{count}{fmt}", self._buf, self._pos - self._start)
        self._pos += count * size
        return list(values)

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        self._fill(size, what)
        value = struct.unpack_from(fmt, self._buf, self._pos - self._start)[0]
        self._pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def raw_string(self, what: str, max_len: int | None = None) -> bytes:
        at = self._pos
        length = int(self.unpack("<Q", 8, what))
        if max_len is not None and length > max_len:
            raise self.fail(f"{what} is {length:,} bytes long, over the limit of {max_len:,}", at)
        if length > self.remaining():
            raise self.overrun(f"{what} claims {length:,} bytes", at)
        return self.take(length, what)

    def string_array(self, count: int, what: str, budget: int) -> tuple[list[str], int]:
        """`count` strings (invalid UTF-8 replaced) and their total length in bytes.

        The hot path for tokenizer vocabularies: strings wholly in the buffer
        are sliced out directly; the rest go through the checked `raw_string`.
        Stops once their bytes exceed `budget`.
        """
        out: list[str] = []
        append = out.append
        unpack_len = _U64.unpack_from
        total = 0
        for _ in range(count):
            buf = self._buf
            i = self._pos - self._start
            if len(buf) - i >= 8:
                (length,) = unpack_len(buf, i)
                end = i + 8 + length
                if end <= len(buf):  # already read, so within the file and the cap
                    append(buf[i + 8 : end].decode("utf-8", errors="replace"))
                    self._pos += 8 + length
                    total += length
                    if total > budget:
                        break
                    continue
            raw = self.raw_string(what)
            append(raw.decode("utf-8", errors="replace"))
            total += len(raw)
            if total > budget:
                break
        return out, total

    def overrun(self, claim: str, at: int) -> GGUFError:
        """The error for a length or count that cannot fit in what may follow."""
        left = self.remaining()
        if self.file_size is not None and self.file_size <= self.cap:
            where = f"the file has only {left:,} bytes left (truncated or corrupt)"
        else:
            where = f"only {left:,} bytes fit under the {self.cap:,}-byte header limit"
        return self.fail(f"{claim}, but {where}", at)


class _Parser:
    """Parses one GGUF header from a `_Reader`."""

    def __init__(self, reader: _Reader, max_metadata_memory: int):
        self.nested_left = MAX_NESTED_ARRAYS
        self.r = reader
        self.budget = max_metadata_memory

    def spend(self, cost: int, key: str) -> None:
        self.budget -= cost
        if self.budget < 0:
            raise self.r.fail(f"the metadata is too large to hold in memory (at key {_show(key)})")

    def key(self, index: int) -> str:
        at = self.r.pos
        raw = self.r.raw_string(f"metadata key #{index}", MAX_KEY_BYTES)
        if not raw:
            raise self.r.fail(f"metadata key #{index} is empty", at)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.r.fail(f"metadata key #{index} is not valid UTF-8", at) from None

    def value(self, vtype: int, key: str, depth: int) -> Any:
        r = self.r
        if vtype == _T_STRING:
            return self.string(key, f"the value of {_show(key)}")
        if vtype == _T_ARRAY:
            return self.array(key, depth + 1)
        spec = _VALUE_TYPES.get(vtype)
        if spec is None:
            raise r.fail(f"key {_show(key)} has unknown value type {vtype}")
        _, fmt, size = spec
        assert fmt is not None
        self.spend(_NUMBER_COST, key)
        return r.unpack("<" + fmt, size, f"the value of {_show(key)}")

    def array(self, key: str, depth: int) -> list[Any]:
        r = self.r
        if depth > MAX_ARRAY_DEPTH:
            raise r.fail(f"key {_show(key)} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        at = r.pos
        etype = r.u32(f"the array type of {_show(key)}")
        count = r.u64(f"the array length of {_show(key)}")
        spec = _VALUE_TYPES.get(etype)
        if spec is None:
            raise r.fail(f"key {_show(key)} is an array of unknown value type {etype}", at)
        _, fmt, size = spec
        if count * size > r.remaining():
            raise r.overrun(f"key {_show(key)} claims {count:,} array elements", at)
        if fmt is not None:
            self.spend(count * _NUMBER_COST, key)
            return r.unpack_array(fmt, count, size, f"the array {_show(key)}")
        self.spend(count * 8, key)  # list slots
        if etype == _T_ARRAY:
            self.nested_left -= count
            if self.nested_left < 0:
                raise r.fail(
                    f"key {_show(key)} makes the header hold more than "
                    f"{MAX_NESTED_ARRAYS:,} nested arrays",
                    at,
                )
        if etype == _T_STRING:
            # the hot path (tokenizer vocabularies): one label, no per-element dispatch,
            # and the fixed cost of every string charged up front so that millions of
            # empty strings are refused at once instead of after seconds of parsing
            self.spend(count * _STRING_COST, key)
            strings, n_bytes = r.string_array(count, f"an element of {_show(key)}", self.budget)
            self.spend(n_bytes, key)
            return strings
        return [self.value(etype, key, depth) for _ in range(count)]

    def string(self, key: str, label: str) -> str:
        r = self.r
        at = r.pos
        length = r.u64(label)
        if length > r.remaining():
            raise r.overrun(f"{label} claims {length:,} bytes", at)
        self.spend(_STRING_COST + length, key)  # before reading it, not after
        return r.take_text(length, label)

    def parse(self) -> GGUFHeader:
        r = self.r
        head = r.peek(64)
        if not head:
            raise GGUFError("not a GGUF file: it is empty", offset=0)
        if not head.startswith(GGUF_MAGIC):
            if len(head) < 4 and GGUF_MAGIC.startswith(head):
                raise GGUFError(f"not a GGUF file: it is only {len(head)} bytes long", offset=0)
            raise GGUFError(f"not a GGUF file: {_describe_start(head)}", offset=0)
        r.skip(4)
        version = r.u32("the version")
        if version == 1:
            raise r.fail("GGUF version 1 is no longer supported (re-convert the model)", 4)
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise r.fail("big-endian GGUF files are not supported", 4)
            raise r.fail(f"unsupported GGUF version {version} (supported: 2 and 3)", 4)
        n_tensors = r.u64("the tensor count")
        n_kv = r.u64("the metadata count")
        # smallest possible entries: key length + 1-byte key + type + 1-byte value;
        # name length + (empty) name + n_dims + type + offset
        if n_kv > MAX_METADATA_ENTRIES or n_tensors > MAX_TENSORS:
            raise r.fail(
                f"the header claims {n_kv:,} metadata entries and {n_tensors:,} tensors; "
                f"at most {MAX_METADATA_ENTRIES:,} and {MAX_TENSORS:,} are accepted",
                8,
            )
        if n_kv * 14 + n_tensors * 24 > r.remaining():
            raise r.overrun(
                f"the header claims {n_kv:,} metadata entries and {n_tensors:,} tensors", 8
            )
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            at = r.pos
            key = self.key(i)
            if key in metadata:
                raise r.fail(f"duplicate metadata key {_show(key)}", at)
            self.spend(_STRING_COST + len(key), key)
            vtype = r.u32(f"the type of {_show(key)}")
            metadata[key] = self.value(vtype, key, 0)
            if key == "general.alignment":
                self.check_alignment(vtype, metadata[key], at)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        tensors = self.tensor_infos(n_tensors, alignment)
        header_size = r.pos
        # llama.cpp pads to the alignment only when there are tensors
        data_offset = -(-header_size // alignment) * alignment if n_tensors else header_size
        return GGUFHeader(
            version=version,
            metadata=metadata,
            tensors=tensors,
            alignment=alignment,
            data_offset=data_offset,
            header_size=header_size,
            file_size=r.file_size,
        )

    def check_alignment(self, vtype: int, value: Any, at: int) -> None:
        if vtype != _T_UINT32:
            raise self.r.fail("general.alignment must be a uint32", at)
        if value == 0 or value & (value - 1):
            raise self.r.fail(f"general.alignment {value} is not a power of 2", at)

    def tensor_infos(self, n_tensors: int, alignment: int) -> tuple[TensorInfo, ...]:
        r = self.r
        seen: set[str] = set()
        tensors: list[TensorInfo] = []
        for i in range(n_tensors):
            at = r.pos
            raw = r.raw_string(f"the name of tensor #{i}", GGML_MAX_NAME - 1)
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise r.fail(f"the name of tensor #{i} is not valid UTF-8", at) from None
            # one label per tensor: building messages eagerly per field costs more than parsing
            label = f"tensor {_show(name)}"
            if name in seen:
                raise r.fail(f"duplicate tensor name {_show(name)}", at)
            seen.add(name)
            self.spend(_STRING_COST * 3 + len(raw), name)
            n_dims = r.u32(label)
            if n_dims > GGML_MAX_DIMS:
                raise r.fail(f"{label} has {n_dims} dimensions, more than ggml's 4")
            shape = tuple(r.unpack_array("q", n_dims, 8, label))
            if any(d <= 0 for d in shape):
                raise r.fail(f"{label} has a dimension <= 0: {shape}")
            n_elements = math.prod(shape)
            if n_elements >= _INT63:
                raise r.fail(f"{label} has more than 2^63 elements: {shape}")
            type_at = r.pos
            ggml_type = r.u32(label)
            spec = GGML_TYPES.get(ggml_type)
            if spec is None:
                raise r.fail(f"{label} has unknown ggml type {ggml_type}", type_at)
            type_name, block, block_bytes = spec
            row = shape[0] if shape else 1
            if row % block:
                raise r.fail(
                    f"{label} of type {type_name} has rows of {row} elements, "
                    f"not a multiple of its block size {block}",
                    type_at,
                )
            n_bytes = n_elements // block * block_bytes
            offset_at = r.pos
            offset = r.u64(label)
            if offset % alignment:
                raise r.fail(
                    f"{label} has offset {offset:,}, not a multiple of the alignment {alignment}",
                    offset_at,
                )
            if offset + n_bytes >= _INT63:
                raise r.fail(f"{label} ends beyond 2^63 bytes", offset_at)
            tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes))
        return tuple(tensors)


def parse_gguf_header(
    read: Callable[[int], bytes],
    *,
    file_size: int | None = None,
    max_header_bytes: int = 64 << 20,
    max_metadata_memory: int = DEFAULT_MAX_METADATA_MEMORY,
) -> GGUFHeader:
    """Parses a GGUF header from `read(n)`, which returns at most n bytes (b"" at the end).

    Reads no further than the end of the tensor infos, and never beyond
    `max_header_bytes`. Raises GGUFError for anything that is not a valid
    little-endian GGUF v2/v3 header.
    """
    reader = _Reader(read, file_size, max_header_bytes)
    return _Parser(reader, max_metadata_memory).parse()


def _open_regular(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Opens a local model file for reading, with a clear error when it isn't one."""
    p = Path(path)
    try:
        # stat first: opening a FIFO would block until some writer appears
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise GGUFError(
                f"{p}: is a directory, not a GGUF file"
                if p.is_dir()
                else f"{p}: not a regular file"
            )
        f = open(p, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise GGUFError(f"{p}: no such file") from None
    except PermissionError:
        raise GGUFError(f"{p}: permission denied") from None
    except OSError as exc:
        raise GGUFError(f"{p}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced since the stat above
            raise GGUFError(f"{p}: not a regular file")
    except BaseException:
        f.close()
        raise
    return f, st.st_size


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Reads and checks the header of a local GGUF file (tensor data is not read)."""
    f, size = _open_regular(path)
    with f:
        try:
            return parse_gguf_header(f.read, file_size=size)
        except GGUFError as exc:
            raise GGUFError(f"{Path(path).name}: {exc}", offset=exc.offset) from None
        except OSError as exc:
            raise GGUFError(f"{path}: read failed: {exc.strerror or exc}") from None


def check_tensor_data(header: GGUFHeader) -> None:
    """Checks that every tensor's data lies inside the file, aligned, without overlap.

    Needs `header.file_size`; raises GGUFError naming the first bad tensor.
    """
    if header.file_size is None:
        raise GGUFError("cannot check tensor data: the file size is unknown")
    if header.tensors and header.data_offset > header.file_size:
        raise GGUFError(
            f"the file is truncated: tensor data should start at byte {header.data_offset:,} "
            f"but the file is {header.file_size:,} bytes",
            offset=header.file_size,
        )
    available = header.file_size - header.data_offset
    previous: TensorInfo | None = None
    for t in sorted(header.tensors, key=lambda t: t.offset):
        if t.offset % header.alignment:
            raise GGUFError(
                f"tensor {_show(t.name)} data at offset {t.offset:,} is not aligned "
                f"to {header.alignment}",
                offset=header.data_offset + t.offset,
            )
        if t.offset + t.n_bytes > available:
            raise GGUFError(
                f"the file is truncated or corrupt: tensor {_show(t.name)} needs bytes up to "
                f"{header.data_offset + t.offset + t.n_bytes:,} but the file is "
                f"{header.file_size:,} bytes",
                offset=header.data_offset + t.offset,
            )
        if previous is not None and t.offset < previous.offset + previous.n_bytes:
            raise GGUFError(
                f"tensors {_show(previous.name)} and {_show(t.name)} overlap "
                f"at data offset {t.offset:,}",
                offset=header.data_offset + t.offset,
            )
        previous = t


def _describe(value: Any) -> str:
    """What a metadata value is, for a message (never the value itself, which may be huge)."""
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return f"an array of {len(value):,} items"
    return "a string"


def _count(header: GGUFHeader, key: str, low: int, high: int) -> int | None:
    """The integer at `key` (None when missing), refused unless low <= value <= high."""
    if key not in header.metadata:
        return None
    value = header.metadata[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{key} is {_describe(value)}, expected a whole number")
    if not low <= value <= high:
        raise GGUFError(f"{key} is {value:,}, outside the range {low:,}..{high:,}")
    return value


def _count_or_max(header: GGUFHeader, key: str, high: int) -> int | None:
    """Like `_count` for keys that may also be per-layer arrays; gives the largest value."""
    value = header.metadata.get(key)
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise GGUFError(f"{key} is an array with items that are not whole numbers")
        if any(not 0 <= v <= high for v in value):
            raise GGUFError(f"{key} has a value outside the range 0..{high:,}")
        return max(value, default=0)
    return _count(header, key, 0, high)


def check_model_metadata(header: GGUFHeader) -> None:
    """Refuses metadata that is well-typed but absurd, before llama.cpp sees it.

    Each check stands for a GGML_ASSERT in llama.cpp's loader (which would
    abort the engine) or for a value that makes llama.cpp or the planner
    misbehave: a chat template that is not text, no or duplicate tokens,
    token arrays of different lengths, a layer count of 0 or over 512,
    impossible expert counts, an unknown RoPE scaling type, a trained
    context of 0 or over 16 Mi tokens, or a SentencePiece vocabulary that
    cannot spell every byte. Raises GGUFError naming the key.
    """
    meta = header.metadata
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"tokenizer.chat_template is {_describe(template)}, not text")
    _check_vocabulary(header)
    arch = header.architecture
    if arch is None:
        return
    n_layer = _count(header, f"{arch}.block_count", 1, LLAMA_MAX_LAYERS)
    if n_layer is None:
        # Every architecture llama.cpp loads has one; without it the file is a
        # vocabulary, a projector, or an architecture it does not know.
        raise GGUFError(
            f"there is no {arch}.block_count: not a model llama.cpp can load "
            f"(architecture {_show(arch)})"
        )
    _count(header, f"{arch}.context_length", 1, MAX_CONTEXT_LENGTH)
    for sub in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
        _count(header, f"{arch}.{sub}", 0, n_layer)
    n_expert = _count(header, f"{arch}.expert_count", 0, LLAMA_MAX_EXPERTS) or 0
    n_used = _count_or_max(header, f"{arch}.expert_used_count", LLAMA_MAX_EXPERTS) or 0
    groups = _count(header, f"{arch}.expert_group_count", 0, LLAMA_MAX_EXPERTS) or 0
    groups_used = _count(header, f"{arch}.expert_group_used_count", 0, LLAMA_MAX_EXPERTS) or 0
    if n_expert == 0 and (n_used or groups):
        raise GGUFError(f"{arch}.expert_used_count or expert_group_count is set without experts")
    if n_expert and not 0 < n_used <= n_expert:
        raise GGUFError(f"{arch}.expert_used_count must be 1..{n_expert} for {n_expert} experts")
    if n_expert and groups >= n_expert:
        raise GGUFError(f"{arch}.expert_group_count ({groups}) must be under the expert count")
    if groups > 1 and (n_expert % groups or not 0 < groups_used < groups):
        raise GGUFError(
            f"{arch}.expert_group_count {groups} and expert_group_used_count {groups_used} "
            f"do not fit {n_expert} experts"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        shown = _show(scaling) if isinstance(scaling, str) else _describe(scaling)
        raise GGUFError(f"{arch}.rope.scaling.type is {shown}, not one llama.cpp knows")


def _check_vocabulary(header: GGUFHeader) -> None:
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"tokenizer.ggml.tokens is {_describe(tokens)} of other than strings")
    if not tokens:
        raise GGUFError("tokenizer.ggml.tokens is empty: the model has no vocabulary")
    # llama.cpp renames empty tokens to "[EMPTY_<id>]", then asserts that the
    # token texts are unique.
    texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(texts)) != len(texts):
        seen: set[str] = set()
        for text in texts:
            if text in seen:
                raise GGUFError(
                    f"tokenizer.ggml.tokens lists the token {_show(text)} more than once"
                )
            seen.add(text)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = meta.get(key)
        # Longer arrays are fine for llama.cpp; shorter ones would be read past.
        if values is not None and (not isinstance(values, list) or len(values) < len(tokens)):
            raise GGUFError(f"{key} is {_describe(values)} for {len(tokens):,} tokens")
    if meta.get("tokenizer.ggml.model") == "llama":
        _check_byte_fallback(set(texts))
    for which in ("bos", "eos"):
        wanted = meta.get(f"tokenizer.ggml.add_{which}_token")
        token_id = meta.get(f"tokenizer.ggml.{which}_token_id")
        # llama.cpp asserts on a missing BOS/EOS id when it must add one.
        if wanted is True and isinstance(token_id, int) and not 0 <= token_id < len(tokens):
            raise GGUFError(
                f"tokenizer.ggml.{which}_token_id {token_id:,} is outside the vocabulary of "
                f"{len(tokens):,} tokens, but the model asks for it on every prompt"
            )


# Bytes that can occur in UTF-8 text (0xC0, 0xC1 and 0xF5..0xFF never do).
_UTF8_BYTES = [b for b in range(0xF5) if b not in (0xC0, 0xC1)]


def _check_byte_fallback(texts: set[str]) -> None:
    """A SentencePiece vocabulary must spell any byte: llama.cpp aborts when it cannot.

    Its SPM tokenizer writes a character that no token covers as byte tokens
    "<0xXX>" (or the byte itself), looked up with std::map::at: a missing one
    throws through the C API and terminates the engine on the first prompt
    containing such a character.
    """
    missing = [
        b for b in _UTF8_BYTES if f"<0x{b:02X}>" not in texts and not (b < 0x80 and chr(b) in texts)
    ]
    if missing:
        raise GGUFError(
            f"the SentencePiece vocabulary lacks the byte token <0x{missing[0]:02X}>"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + ": llama.cpp would abort on text it cannot spell"
        )


def validate_gguf_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Reads a local GGUF's header and checks its tensor layout and metadata.

    The engine's gate before llama.cpp: what passes loads without tripping
    the loader's asserts known to us (see check_model_metadata).
    """
    header = read_gguf_header(path)
    try:
        check_tensor_data(header)
        check_model_metadata(header)
    except GGUFError as exc:
        raise GGUFError(f"{Path(path).name}: {exc}", offset=exc.offset) from None
    return header


def _safe_url(url: httpx.URL | str) -> str:
    """The URL without query or credentials, for messages (signed URLs carry tokens)."""
    u = httpx.URL(str(url))
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _TransportError(GGUFError):
    """A GGUFError from the HTTP side (its message already names the URL)."""


class _RemoteSource:
    """`read(n)` over HTTP: Range requests of growing size, or one stream when Range is ignored.

    Each request goes to the original URL (redirects followed per request),
    so credentials are never sent to a redirect's other origin.
    """

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        headers: Mapping[str, str] | None,
        first_chunk: int,
        max_bytes: int,
    ):
        self.client = client
        self.url = url
        self.headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self.chunk = max(1, first_chunk)
        self.max_bytes = max_bytes
        self.pos = 0  # offset of the next byte to hand out
        # bytes fetched ahead of pos start at buf[off]; a bytearray with an offset
        # keeps appends and small reads linear for multi-MiB headers
        self.buf = bytearray()
        self.off = 0
        self.file_size: int | None = None
        self.received = 0  # body bytes received, for logs and tests
        self.requests = 0
        self._response: httpx.Response | None = None  # open 200 stream (Range ignored)
        self._stream: Iterator[bytes] | None = None

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None
            self._stream = None

    def start(self) -> None:
        """The first request: fetches `first_chunk` bytes and learns the file size."""
        self._fetch(1)

    def _fail(self, message: str, status: int | None = None) -> GGUFError:
        return _TransportError(f"{_safe_url(self.url)}: {message}", status=status)

    def _request(self, start: int, length: int) -> httpx.Response:
        headers = {**self.headers, "Range": f"bytes={start}-{start + length - 1}"}
        self.requests += 1
        try:
            response = self.client.send(
                self.client.build_request("GET", self.url, headers=headers),
                stream=True,
                follow_redirects=True,
            )
        except httpx.TooManyRedirects:
            raise self._fail("too many redirects") from None
        except httpx.TimeoutException:
            raise self._fail("the server did not answer in time") from None
        except httpx.ConnectError as exc:
            raise self._fail(f"cannot connect: {exc}") from None
        except httpx.HTTPError as exc:
            raise self._fail(f"request failed: {exc}") from None
        status = response.status_code
        if status in (200, 206, 416):
            return response
        response.close()
        if status in (401, 403):
            raise self._fail(f"access refused (HTTP {status})", status)
        if status == 404:
            raise self._fail("not found (HTTP 404)", status)
        raise self._fail(f"the server answered HTTP {status}", status)

    def _body(self, response: httpx.Response, limit: int) -> bytes:
        """At most `limit` bytes of a response body; closes the response."""
        parts: list[bytes] = []
        got = 0
        try:
            for part in response.iter_raw():
                parts.append(part[: limit - got])
                got += len(parts[-1])
                if got >= limit:
                    break
        except httpx.HTTPError as exc:
            raise self._fail(f"the connection failed while reading: {exc}") from None
        finally:
            response.close()
        self.received += got
        return b"".join(parts)

    def _fetch(self, n: int) -> None:
        """Fetches at least `n` bytes past the buffer, or to the end of the file."""
        start = self.pos + self.buffered()
        length = max(n, self.chunk)
        self.chunk *= 2  # geometric growth: few requests for big headers
        length = min(length, max(1, self.max_bytes - start))
        if self.file_size is not None:
            length = min(length, self.file_size - start)
            if length <= 0:
                return
        response = self._request(start, length)
        if response.status_code == 416:
            response.close()
            if self.file_size is None:
                self.file_size = start
            return
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise self._fail(f"the server sent the file {encoding}-encoded; expected raw bytes")
        if response.status_code == 200:
            # Range ignored: read this one stream as far as needed, then close it
            if self.file_size is None:
                size = response.headers.get("Content-Length")
                self.file_size = int(size) if size and size.isdigit() else None
            self._response = response
            self._stream = response.iter_raw()
            self._skip(start)
            self._read_stream(n)
            return
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != start:
            response.close()
            raise self._fail("the server answered a Range request with a wrong Content-Range")
        if match.group(3) != "*":
            self.file_size = int(match.group(3))
        self.buf += self._body(response, length)

    def _skip(self, count: int) -> None:
        """Discards the first `count` bytes of the open stream (already handed out)."""
        while count > 0:
            part = self._next_part()
            if not part:
                raise self._fail("the file ended early")
            if len(part) > count:
                self.buf += part[count:]
            count -= len(part)

    def _next_part(self) -> bytes:
        assert self._stream is not None
        try:
            part = next(self._stream, b"")
        except httpx.HTTPError as exc:
            raise self._fail(f"the connection failed while reading: {exc}") from None
        self.received += len(part)
        return part

    def buffered(self) -> int:
        return len(self.buf) - self.off

    def _read_stream(self, n: int) -> None:
        while self.buffered() < n:
            part = self._next_part()
            if not part:
                self.close()
                return
            self.buf += part

    def read(self, n: int) -> bytes:
        if self.buffered() < n:
            if self._stream is not None:
                self._read_stream(n)
            else:
                self._fetch(n - self.buffered())
        out = bytes(self.buf[self.off : self.off + n])
        self.off += len(out)
        self.pos += len(out)
        if self.off > len(self.buf) // 2:
            del self.buf[: self.off]
            self.off = 0
        return out


def read_remote_gguf_header(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    max_bytes: int = 64 << 20,
    first_chunk: int = 1 << 20,
) -> GGUFHeader:
    """Reads a remote GGUF's header with HTTP Range requests, before any download.

    Starts with `first_chunk` bytes and doubles the request size until the
    tensor infos end; never reads more than `max_bytes`. `headers` (such as
    Authorization) go to the URL's own origin only. Raises GGUFError, with
    `status` set when the server refused (401/403) or lacks (404) the file.
    """
    own_client = client is None
    if client is None:
        client = httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0))
    source = _RemoteSource(client, url, headers, first_chunk, max_bytes)
    try:
        source.start()
        header = parse_gguf_header(
            source.read, file_size=source.file_size, max_header_bytes=max_bytes
        )
    except _TransportError:
        raise
    except GGUFError as exc:
        raise GGUFError(f"{_safe_url(url)}: {exc}", offset=exc.offset) from None
    finally:
        source.close()
        if own_client:
            client.close()
    log.debug(
        "read GGUF header of %s: %d bytes in %d requests",
        _safe_url(url),
        source.received,
        source.requests,
    )
    return header
