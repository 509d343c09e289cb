"""Tests for engine/gguf/header.py: valid files, a hostile corpus, fuzzing, the real model, HTTP."""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import PeregrineError
from engine.gguf.header import (
    GGML_TYPES,
    GGUFError,
    GGUFHeader,
    TensorInfo,
    check_tensor_data,
    parse_gguf_header,
    read_gguf_header,
    read_remote_gguf_header,
    validate_gguf_file,
)
from tests import gguf_fixtures as fx

MEMORY_LIMIT = 256 << 20


def parse_bytes(data: bytes, *, known_size: bool = True, **kwargs: Any) -> GGUFHeader:
    return parse_gguf_header(
        io.BytesIO(data).read, file_size=len(data) if known_size else None, **kwargs
    )


def assert_one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message and "\n" not in message and "\r" not in message


# --- valid files ------------------------------------------------------------------------


def test_small_model_fields() -> None:
    data = fx.small_model_bytes()
    h = parse_bytes(data)
    assert h.version == 3
    assert h.architecture == "llama"
    assert h.name == "tiny"
    assert h.context_length == 256
    assert h.block_count == 1
    assert h.chat_template == "{{ messages }}"
    assert h.get("tokenizer.ggml.tokens") == ["<s>", "a", "b", "c"]
    assert h.get("tokenizer.ggml.scores") == [0.0, -1.0, -2.0, -3.0]
    assert h.get("tokenizer.ggml.token_type") == [3, 1, 1, 1]
    assert h.arch_get("block_count") == 1
    assert h.file_type == 3
    assert h.quant_name == "Q4_1"
    assert h.nextn_layers == 0
    assert [t.name for t in h.tensors] == [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.weight",
        "output.weight",
    ]
    assert h.tensors[0] == TensorInfo("token_embd.weight", (32, 4), 3, 0, 80)
    assert h.tensors[0].type_name == "Q4_1"
    assert h.n_params == 32 * 4 + 32 + 32 * 32 + 32 * 4
    assert h.tensor_bytes == 80 + 128 + 640 + 136
    assert h.alignment == 32
    assert h.data_offset % 32 == 0 and h.data_offset >= h.header_size
    assert h.file_size == len(data)
    check_tensor_data(h)


def test_missing_keys_give_defaults() -> None:
    h = parse_bytes(fx.make_gguf_bytes({}, []))
    assert h.architecture is None and h.name is None and h.chat_template is None
    assert h.context_length is None and h.block_count is None and h.file_type is None
    assert h.arch_get("context_length", 7) == 7
    assert h.get("nope", "x") == "x"
    assert h.nextn_layers == 0 and h.n_params == 0 and h.tensor_bytes == 0
    assert h.quant_name is None
    assert h.data_offset == h.header_size  # no tensors: no padding (as llama.cpp)


def test_wrongly_typed_keys_are_tolerated() -> None:
    h = parse_bytes(
        fx.make_gguf_bytes(
            {
                "general.architecture": "qwen3",
                "qwen3.context_length": "long",
                "qwen3.block_count": True,
                "general.name": 5,
            },
            [],
        )
    )
    assert h.context_length is None and h.block_count is None and h.name is None


def test_quant_name_falls_back_to_most_common_weight_type() -> None:
    tensors = [
        ("token_embd.weight", (256, 8), 12),
        ("blk.0.ffn_up.weight", (256, 64), 12),
        ("blk.0.attn_norm.weight", (256,), 0),
        ("output.weight", (256, 8), 8),  # Q8_0
    ]
    h = parse_bytes(fx.make_gguf_bytes({"general.architecture": "llama"}, tensors))
    assert h.file_type is None
    assert h.quant_name == "Q4_K"
    # a file_type that names no known quantization also falls back
    h = parse_bytes(fx.make_gguf_bytes({"general.file_type": 999}, tensors))
    assert h.quant_name == "Q4_K"
    h = parse_bytes(fx.make_gguf_bytes({"general.file_type": 15}, tensors))
    assert h.quant_name == "Q4_K_M"


def test_nextn_layers_and_version_2() -> None:
    data = fx.make_gguf_bytes(
        {"general.architecture": "glm4moe", "glm4moe.nextn_predict_layers": 1},
        [("w", (32,), 0)],
        version=2,
    )
    h = parse_bytes(data)
    assert h.version == 2
    assert h.nextn_layers == 1


def test_all_metadata_value_types_round_trip() -> None:
    meta = {
        "u8": fx.Typed(255, fx.UINT8),
        "i8": fx.Typed(-128, fx.INT8),
        "u16": fx.Typed(65535, fx.UINT16),
        "i16": fx.Typed(-32768, fx.INT16),
        "u32": fx.Typed(1 << 31, fx.UINT32),
        "i32": fx.Typed(-(1 << 31), fx.INT32),
        "f32": fx.Typed(0.5, fx.FLOAT32),
        "bool": True,
        "str": "héllo ✓",
        "u64": fx.Typed((1 << 64) - 1, fx.UINT64),
        "i64": fx.Typed(-(1 << 63), fx.INT64),
        "f64": fx.Typed(0.1, fx.FLOAT64),
        "arr": fx.Typed([1, 2, 3], fx.UINT16),
        "nested": [["a", "b"], ["c"]],
        "empty": [],
    }
    h = parse_bytes(fx.make_gguf_bytes(meta, []))
    expected = {k: (v.value if isinstance(v, fx.Typed) else v) for k, v in meta.items()}
    assert h.metadata == expected


def test_invalid_utf8_in_values_is_replaced_not_refused() -> None:
    data = fx.preamble(0, 2) + fx.kv("general.name", b"caf\xe9")
    data += fx.kv("tokenizer.ggml.tokens", [b"ok", b"\xff", "✓"])
    h = parse_bytes(data)
    assert h.name == "caf\ufffd"
    assert h.get("tokenizer.ggml.tokens") == ["ok", "\ufffd", "✓"]


def test_every_ggml_type_is_accepted_with_its_block_size() -> None:
    tensors = [(f"t{tid}", (block * 2, 3), tid) for tid, (_, block, _) in GGML_TYPES.items()]
    out = bytearray(fx.preamble(len(tensors), 0))
    offset = 0
    for name, shape, tid in tensors:
        out += fx.tensor_info(name, shape, tid, offset)
        offset += 1 << 16
    h = parse_bytes(bytes(out))
    for t, (name, shape, tid) in zip(h.tensors, tensors, strict=True):
        _, block, block_bytes = GGML_TYPES[tid]
        assert (t.name, t.shape, t.ggml_type) == (name, shape, tid)
        assert t.n_bytes == shape[0] // block * shape[1] * block_bytes


def test_ggml_types_match_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)] == (qtype.name, block, size)


def test_fixture_writer_agrees_with_gguf_reader(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    path.write_bytes(fx.small_model_bytes())
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b", "c"]
    ours = read_gguf_header(path)
    assert [t.name for t in reader.tensors] == [t.name for t in ours.tensors]
    assert [int(t.data_offset) for t in reader.tensors] == [
        ours.data_offset + t.offset for t in ours.tensors
    ]


# --- hostile input ----------------------------------------------------------------------

HOSTILE = fx.hostile_cases()
LAYOUT = fx.layout_cases()
CORPUS = sorted(fx.HOSTILE_DIR.glob("*.gguf"))
LAYOUT_CORPUS = sorted((fx.HOSTILE_DIR / "layout").glob("*.gguf"))


def bounded(fn: Callable[[], Any]) -> Any:
    """Runs `fn` and asserts its peak Python memory stays under the limit."""
    tracemalloc.start()
    try:
        return fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_LIMIT


def test_committed_corpus_matches_the_generator() -> None:
    assert {p.name: p.read_bytes() for p in CORPUS} == HOSTILE
    assert {p.name: p.read_bytes() for p in LAYOUT_CORPUS} == LAYOUT
    assert all(p.stat().st_size <= 4096 for p in CORPUS + LAYOUT_CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_hostile_file_is_refused(path: Path) -> None:
    with pytest.raises(GGUFError) as info:
        bounded(lambda: read_gguf_header(path))
    assert_one_line(info.value)
    assert path.name in str(info.value)
    with pytest.raises(GGUFError):
        validate_gguf_file(path)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_stream_of_unknown_size_is_refused(name: str) -> None:
    # no file size: only the header cap bounds what a count may claim
    with pytest.raises(GGUFError) as info:
        bounded(lambda: parse_bytes(HOSTILE[name], known_size=False))
    assert_one_line(info.value)


@pytest.mark.parametrize("path", LAYOUT_CORPUS, ids=lambda p: p.name)
def test_bad_tensor_layout_is_refused_by_validation(path: Path) -> None:
    header = read_gguf_header(path)  # the header itself is fine
    assert header.tensors
    with pytest.raises(GGUFError) as info:
        validate_gguf_file(path)
    assert_one_line(info.value)
    assert path.name in str(info.value)


def test_hostile_messages_say_what_and_where() -> None:
    expectations = {
        "version_1.gguf": "version 1 is no longer supported",
        "big_endian.gguf": "big-endian",
        "byteswapped_magic.gguf": "big-endian",
        "text.gguf": "text file",
        "lfs_pointer.gguf": "Git LFS pointer",
        "html.gguf": "HTML",
        "empty.gguf": "empty",
        "huge_kv_count.gguf": "metadata entries",
        "unknown_tensor_type.gguf": "unknown ggml type 4",
        "too_many_dims.gguf": "5 dimensions",
        "duplicate_key.gguf": "duplicate metadata key",
        "duplicate_tensor.gguf": "duplicate tensor name",
        "nested_arrays_too_deep.gguf": "nests arrays deeper",
        "misaligned_offset.gguf": "not a multiple of the alignment",
    }
    for name, words in expectations.items():
        with pytest.raises(GGUFError) as info:
            parse_bytes(HOSTILE[name])
        assert words in str(info.value), name
    with pytest.raises(GGUFError) as info:
        parse_bytes(HOSTILE["unknown_value_type.gguf"])
    assert "(at byte 48)" in str(info.value) and info.value.offset == 48


def test_newlines_in_hostile_names_stay_on_one_line() -> None:
    data = fx.preamble(1, 0) + fx.tensor_info("evil\nname\r", (33, 7), 2, 0)
    with pytest.raises(GGUFError) as info:
        parse_bytes(data)
    assert_one_line(info.value)
    assert "evil\\nname" in str(info.value)


def test_metadata_memory_is_bounded() -> None:
    tokens = ["ab"] * 50_000
    data = fx.make_gguf_bytes({"tokenizer.ggml.tokens": tokens}, [])
    assert parse_bytes(data).get("tokenizer.ggml.tokens") == tokens
    with pytest.raises(GGUFError, match="too large to hold in memory"):
        parse_bytes(data, max_metadata_memory=1 << 20)


def test_big_string_is_refused_before_it_is_read() -> None:
    data = fx.preamble(0, 1) + fx.kv("general.name", "x" * (30 << 20))
    stream = io.BytesIO(data)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match="too large to hold in memory"):
            parse_gguf_header(stream.read, file_size=len(data), max_metadata_memory=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert stream.tell() < 1 << 20


def test_header_cap_is_enforced() -> None:
    data = fx.make_gguf_bytes({"general.name": "x" * 10_000}, [])
    with pytest.raises(
        GGUFError, match=r"claims 10,000 bytes, but only .* 4,096-byte header limit"
    ):
        parse_bytes(data, max_header_bytes=4096)
    with pytest.raises(GGUFError, match="4,096-byte header limit"):
        parse_bytes(fx.make_gguf_bytes({f"k{i}": 1 for i in range(400)}, []), max_header_bytes=4096)


def test_reader_never_reads_far_past_the_header() -> None:
    data = fx.small_model_bytes(with_data=False) + bytes(10 << 20)
    stream = io.BytesIO(data)
    h = parse_gguf_header(stream.read, file_size=len(data))
    assert stream.tell() <= h.header_size + (64 << 10)


def test_one_byte_reads_work() -> None:
    data = fx.small_model_bytes()
    stream = io.BytesIO(data)
    assert parse_gguf_header(lambda n: stream.read(1), file_size=None) == parse_bytes(
        data, known_size=False
    )


def test_paths_that_are_not_gguf_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    cases = {
        tmp_path / "missing.gguf": "no such file",
        tmp_path: "is a directory",
        tmp_path / "empty.gguf": "it is empty",
    }
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.gguf")  # opening it would block: it must not be opened
        cases[tmp_path / "fifo.gguf"] = "not a regular file"
    for path, words in cases.items():
        for fn in (read_gguf_header, validate_gguf_file):
            with pytest.raises(GGUFError, match=words) as info:
                fn(path)
            assert_one_line(info.value)
            assert isinstance(info.value, PeregrineError)


def test_valid_file_passes_validation(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(fx.small_model_bytes())
    assert validate_gguf_file(path) == read_gguf_header(path)
    assert path.read_bytes() == fx.small_model_bytes()  # nothing was written


# --- fuzzing -----------------------------------------------------------------------------

SEED = fx.small_model_bytes()


def parse_or_refuse(data: bytes) -> None:
    """Only a header or a GGUFError may come out (any other exception fails the test)."""
    for known in (True, False):
        try:
            header = parse_bytes(data, known_size=known)
        except GGUFError as exc:
            assert_one_line(exc)
            continue
        assert isinstance(header, GGUFHeader)
        if known:
            try:
                check_tensor_data(header)
            except GGUFError as exc:
                assert_one_line(exc)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=8))
def test_fuzz_byte_mutations(changes: list[tuple[int, int]]) -> None:
    data = bytearray(SEED)
    for pos, value in changes:
        data[pos] = value
    parse_or_refuse(bytes(data))


@FUZZ
@given(st.integers(0, len(SEED)), st.integers(0, len(SEED)), st.binary(max_size=32))
def test_fuzz_cut_and_splice(start: int, end: int, insert: bytes) -> None:
    parse_or_refuse(SEED[:start] + insert + SEED[max(start, end) :])


@FUZZ
@given(st.integers(0, len(SEED) - 8), st.sampled_from([0, 1, 7, 1 << 31, 1 << 62, (1 << 64) - 1]))
def test_fuzz_big_integers_anywhere(pos: int, value: int) -> None:
    parse_or_refuse(SEED[:pos] + value.to_bytes(8, "little") + SEED[pos + 8 :])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    parse_or_refuse(data)
    parse_or_refuse(b"GGUF" + data)
    parse_or_refuse(b"GGUF\x03\0\0\0" + data)


# --- the real default model -------------------------------------------------------------


def test_real_model_matches_gguf_reader(default_model: Path) -> None:
    gguf = pytest.importorskip("gguf")
    ours = validate_gguf_file(default_model)
    reader = gguf.GGUFReader(default_model)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(theirs)
    for key, value in theirs.items():
        assert ours.metadata[key] == value, key
    assert len(ours.get("tokenizer.ggml.tokens")) == 49152
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert ours.data_offset == reader.data_offset
    assert ours.alignment == reader.alignment
    assert len(ours.tensors) == len(reader.tensors)
    for t, r in zip(ours.tensors, reader.tensors, strict=True):
        assert t.name == r.name
        assert t.shape == tuple(int(d) for d in r.shape)
        assert t.ggml_type == int(r.tensor_type)
        assert ours.data_offset + t.offset == int(r.data_offset)
        assert t.n_bytes == int(r.n_bytes)


def test_real_model_summary(default_model: Path) -> None:
    h = validate_gguf_file(default_model)
    assert h.architecture == "llama"
    assert h.block_count == 30
    assert h.context_length == 8192
    assert h.arch_get("embedding_length") == 576
    assert h.arch_get("attention.head_count_kv") == 3
    assert h.quant_name == "Q4_1"
    assert h.chat_template is not None and "<|im_start|>" in h.chat_template
    assert h.file_size == default_model.stat().st_size
    assert h.n_params == pytest.approx(135e6, rel=0.01)
    assert h.tensor_bytes < h.file_size
    assert h.header_size < 4 << 20


# --- remote headers over loopback HTTP ----------------------------------------------------


@dataclass
class Served:
    """What a loopback file server did, readable after `stop()`."""

    base: str = ""
    bytes_sent: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(path: Path, mode: str, served: Served, limit: int | None) -> type:
    size = path.stat().st_size if limit is None else limit

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows failures

        def do_GET(self) -> None:
            with served.lock:
                served.requests.append({"path": self.path, **dict(self.headers.items())})
            if self.path.startswith("/redirect/"):
                port = self.server.server_address[1]
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/{self.path[10:]}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "gzip":
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "forbidden" or self.path != "/model.gguf":
                self.send_error(403 if mode == "forbidden" else 404)
                return
            start, end = 0, size - 1
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            if mode == "range" and match:
                start, end = int(match.group(1)), min(int(match.group(2)), size - 1)
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    left = end - start + 1
                    while left > 0:
                        chunk = f.read(min(left, 1 << 16))
                        self.wfile.write(chunk)
                        left -= len(chunk)
                        with served.lock:
                            served.bytes_sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client read what it needed and hung up: expected

    return Handler


@contextmanager
def file_server(path: Path, mode: str = "range", limit: int | None = None) -> Iterator[Served]:
    served = Served()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(path, mode, served, limit))
    server.daemon_threads = False
    server.block_on_close = True  # server_close() joins the handler threads
    served.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def stop(server_cm: Any) -> None:
    server_cm.__exit__(None, None, None)


def test_remote_header_equals_local_and_reads_little(default_model: Path) -> None:
    local = read_gguf_header(default_model)
    cm = file_server(default_model)
    served = cm.__enter__()
    remote = read_remote_gguf_header(f"{served.base}/model.gguf", first_chunk=256 << 10)
    stop(cm)  # joins the handler threads, so the byte count is final
    assert remote == local
    assert served.bytes_sent < 8 << 20
    assert len(served.requests) >= 3  # grew geometrically from 256 KiB
    assert all("Range" in r for r in served.requests)


def test_remote_server_ignoring_range(default_model: Path) -> None:
    local = read_gguf_header(default_model)
    cm = file_server(default_model, mode="ignore-range")
    served = cm.__enter__()
    remote = read_remote_gguf_header(f"{served.base}/model.gguf")
    stop(cm)
    assert remote == local
    assert len(served.requests) == 1
    # the stream was closed early; kernel socket buffers allow some read-ahead
    assert served.bytes_sent < local.file_size // 3


def test_remote_forbidden_keeps_the_status(default_model: Path) -> None:
    with (
        file_server(default_model, mode="forbidden") as served,
        pytest.raises(GGUFError, match="access refused") as info,
    ):
        read_remote_gguf_header(f"{served.base}/model.gguf")
    assert info.value.status == 403
    assert_one_line(info.value)


def test_remote_not_found(default_model: Path) -> None:
    with file_server(default_model) as served, pytest.raises(GGUFError, match="not found") as info:
        read_remote_gguf_header(f"{served.base}/other.gguf?token=secret")
    assert info.value.status == 404
    assert "secret" not in str(info.value)


def test_remote_redirect_to_another_origin_drops_credentials(default_model: Path) -> None:
    local = read_gguf_header(default_model)
    with file_server(default_model) as served:
        remote = read_remote_gguf_header(
            f"{served.base}/redirect/model.gguf", headers={"Authorization": "Bearer hf_secret"}
        )
    assert remote == local
    first, *others = served.requests
    assert first["Authorization"] == "Bearer hf_secret"
    redirected = [r for r in others if r["path"] == "/model.gguf"]
    assert redirected and all(r["Host"].startswith("localhost:") for r in redirected)
    assert all("Authorization" not in r for r in redirected)


def test_remote_truncated_file(default_model: Path) -> None:
    with (
        file_server(default_model, limit=500_000) as served,
        pytest.raises(GGUFError, match="truncated") as info,
    ):
        read_remote_gguf_header(f"{served.base}/model.gguf", first_chunk=64 << 10)
    assert_one_line(info.value)


def test_remote_header_larger_than_cap(default_model: Path) -> None:
    with file_server(default_model) as served, pytest.raises(GGUFError, match="limit") as info:
        read_remote_gguf_header(f"{served.base}/model.gguf", max_bytes=512 << 10)
    assert_one_line(info.value)
    assert served.bytes_sent <= 512 << 10


def test_remote_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GGUFError, match="cannot connect") as info:
        read_remote_gguf_header(f"http://127.0.0.1:{port}/model.gguf")
    assert_one_line(info.value)


def test_remote_hostile_file(tmp_path: Path) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE["huge_array_length.gguf"])
    with file_server(path) as served, pytest.raises(GGUFError, match="array elements") as info:
        read_remote_gguf_header(f"{served.base}/model.gguf")
    assert served.base in str(info.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with file_server(empty) as served, pytest.raises(GGUFError, match="empty"):
        read_remote_gguf_header(f"{served.base}/model.gguf")


def test_remote_compressed_answer_is_refused(default_model: Path) -> None:
    with (
        file_server(default_model, mode="gzip") as served,
        pytest.raises(GGUFError, match="gzip-encoded") as info,
    ):
        read_remote_gguf_header(f"{served.base}/model.gguf")
    assert_one_line(info.value)


@pytest.mark.parametrize("mode", ["range", "ignore-range"])
def test_remote_big_header_in_few_requests(tmp_path: Path, mode: str) -> None:
    tokens = [f"token{i}" for i in range(300_000)]
    path = tmp_path / "big.gguf"
    path.write_bytes(
        fx.make_gguf_bytes({"tokenizer.ggml.tokens": tokens}, [("w", (256, 4), 12)], with_data=True)
    )
    local = read_gguf_header(path)
    assert local.header_size > 4 << 20
    cm = file_server(path, mode=mode)
    served = cm.__enter__()
    remote = read_remote_gguf_header(f"{served.base}/model.gguf", first_chunk=64 << 10)
    stop(cm)
    assert remote == local
    # 64 KiB doubling to cover ~5.7 MB: 7 requests (64 KiB × (2^7 - 1) = 8 MiB), or one stream when Range is ignored
    assert len(served.requests) == (7 if mode == "range" else 1)
    assert served.bytes_sent < 2 * local.header_size + (1 << 20)
