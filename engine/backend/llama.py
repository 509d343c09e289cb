"""A thin, typed wrapper over llama-cpp-python's low-level API.

Everything that touches a llama.cpp handle lives here; the decoding loop
(`engine/decoding/`) talks only to `LlamaModel` and the samplers it hands out.
One instance is used from one thread (the engine's decode thread): llama.cpp
contexts are not thread-safe.

Every KV and state operation names its sequence id. A context holds
`n_seq_max` sequences (a load setting); the engine uses one per slot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from engine.backend.mtp import MtpContext, attach_mtp, plan_mtp
from engine.errors import PeregrineError
from engine.runtimes import ensure_backends
from engine.wire.base import KV_TYPE_IDS
from engine.wire.control import LoadRequest

log = logging.getLogger("peregrine.llama")

FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
_LLAMA_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


class DecodeError(PeregrineError):
    """llama_decode failed (no KV slot, aborted, or an internal error)."""


class ContextFull(DecodeError):
    """llama_decode found no room in the KV cache for the batch (it changed nothing)."""


@dataclass(frozen=True)
class BatchPart:
    """Tokens of one sequence in a shared batch, at positions pos0..; logits for
    the last token, or for every token when `logits_all` (a verify run)."""

    seq: int
    tokens: Sequence[int]
    pos0: int
    logits_all: bool = False


@dataclass(frozen=True)
class MemoryReport:
    """Buffer sizes as llama.cpp logged them while loading (bytes)."""

    weights: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


# The capture that llama.cpp's log goes to (the newest one made in this process).
_active_capture: LlamaLogCapture | None = None


def _route_log(level: int, text: bytes, user: Any) -> None:
    capture = _active_capture
    if capture is not None:
        capture._on_log(level, text, user)


# One C callback for the life of the process: llama.cpp keeps the pointer it is
# given, so a callback owned by a capture that was garbage-collected would crash
# the next call that logs (a quantize or a load after an in-process engine went).
_LOG_CALLBACK = llama_cpp.llama_log_callback(_route_log)


class LlamaLogCapture:
    """Routes llama.cpp's log to Python logging and keeps the buffer sizes it reports.

    The newest capture receives the log; llama.cpp only ever sees the
    process-wide `_LOG_CALLBACK`, so a capture may be dropped at any time.
    """

    def __init__(self) -> None:
        global _active_capture
        self.lines: list[str] = []
        self._partial = ""
        _active_capture = self
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        message = self._partial + text.decode("utf-8", errors="replace")
        if not message.endswith("\n"):
            self._partial = message
            return
        self._partial = ""
        for line in message.splitlines():
            if line.strip():
                self.lines.append(line)
                log.log(_LLAMA_LEVELS.get(level, logging.INFO), "%s", line)
        if len(self.lines) > 4000:
            del self.lines[:2000]

    def mark(self) -> int:
        return len(self.lines)

    def memory_since(self, mark: int) -> MemoryReport:
        return parse_memory_log(self.lines[mark:])

    def error_since(self, mark: int) -> str | None:
        """llama.cpp's reason for a failure since `mark`, if it logged one.

        Its "error loading model: <reason>" line says why; the lines after it
        only say that loading failed.
        """
        lines = self.lines[mark:]
        for line in reversed(lines):
            if "error loading model:" in line:
                return " ".join(line.split("error loading model:", 1)[1].split())[:300]
        for line in reversed(lines):
            if "error" in line.lower():
                return " ".join(line.split())[:300]
        return None


def parse_memory_log(lines: Sequence[str]) -> MemoryReport:
    """Sums the model, KV and compute buffer sizes from llama.cpp's log lines."""
    weights = kv = compute = 0.0
    for line in lines:
        if "model buffer size" in line and "=" in line:
            weights += _mib(line.rsplit("=", 1)[1])
        elif line.startswith("llama_kv_cache: size") or "llama_kv_cache: size" in line:
            kv += _mib(line.split("=", 1)[1].split("(")[0])
        elif "compute buffer size" in line and "=" in line:
            compute += _mib(line.rsplit("=", 1)[1])
    return MemoryReport(int(weights * 2**20), int(kv * 2**20), int(compute * 2**20))


def _mib(text: str) -> float:
    number = text.strip().split()[0]
    try:
        return float(number)
    except ValueError:
        return 0.0


def default_threads() -> int:
    """Physical cores: hyperthreads slow llama.cpp's decode down."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil may be unable to read the topology in containers
        cores = None
    return max(1, cores or os.cpu_count() or 1)


# The user's own setting, restored when a load without batch_invariant follows one with it.
_TILED_MM_ENV = os.environ.get("GGML_CPU_TILED_MM")


def _set_batch_invariant_products(on: bool) -> None:
    """The CPU products of `LoadRequest.batch_invariant` (docs/architecture.md,
    "Exactness"). Repacked weights are a model parameter; llama.cpp's tiled K-quant
    product (8 rows or more; fewer go through vec_dot, rounding differently) is
    switched by GGML_CPU_TILED_MM, which our build reads at every product.
    """
    if on:
        os.environ["GGML_CPU_TILED_MM"] = "0"
    elif _TILED_MM_ENV is None:
        os.environ.pop("GGML_CPU_TILED_MM", None)
    else:
        os.environ["GGML_CPU_TILED_MM"] = _TILED_MM_ENV


def _apply_expert_offload(mparams: Any, request: LoadRequest) -> Any:
    """Keeps MoE expert tensors in system RAM: all of them (`expert_offload`,
    llama-server's --cpu-moe) or those of the first `n_cpu_moe` layers (--n-cpu-moe),
    through llama.cpp's tensor buffer overrides. Returns the override array, which
    must outlive the load; None when nothing is overridden.
    """
    from engine.planning.probe import expert_overrides

    overrides = expert_overrides(request)
    if overrides is not None:
        mparams.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    return overrides


class LlamaModel:
    """One loaded model with one context of `n_seq_max` sequences, driven from one thread."""

    def __init__(
        self,
        request: LoadRequest,
        *,
        n_seq_max: int | None = None,
        progress: Callable[[float], bool | None] | None = None,
        log_capture: LlamaLogCapture | None = None,
    ) -> None:
        # One sequence per parallel slot (the request's n_parallel by default).
        n_seq_max = request.n_parallel if n_seq_max is None else n_seq_max
        if n_seq_max < 1:
            raise PeregrineError(f"n_seq_max must be at least 1, not {n_seq_max}")
        self.request = request
        self.n_seq_max = n_seq_max
        self._log = log_capture
        mark = log_capture.mark() if log_capture else 0
        ensure_backends()  # a backend-DL build registers none by itself
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = request.n_gpu_layers if request.n_gpu_layers >= 0 else 999
        self._tensor_split: Any = None
        if request.tensor_split:
            arr = (ctypes.c_float * len(request.tensor_split))(*request.tensor_split)
            self._tensor_split = arr
            mparams.tensor_split = arr
        self._overrides = _apply_expert_offload(mparams, request)
        mparams.use_extra_bufts = not request.batch_invariant
        _set_batch_invariant_products(request.batch_invariant)
        # Keep the callback referenced for the whole load. `progress` returning
        # False aborts the load (a newer load replaced this one).
        self._progress_cb = llama_cpp.llama_progress_callback(
            lambda value, _user: progress is None or progress(float(value)) is not False
        )
        mparams.progress_callback = self._progress_cb
        # MTP heads (engine/backend/mtp.py): loaded only where they will be used.
        self.mtp_plan = plan_mtp(request.model, wanted=request.mtp)
        mparams.load_mtp = self.mtp_plan.load
        model = llama_cpp.llama_model_load_from_file(request.model.encode("utf-8"), mparams)
        if not model:
            reason = log_capture.error_since(mark) if log_capture else None
            raise PeregrineError(
                f"llama.cpp could not load the model: {request.model}"
                + (f" ({reason})" if reason else "")
            )
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)

        threads = request.threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = request.n_ctx
        cparams.n_batch = request.n_batch
        cparams.n_ubatch = min(request.n_ubatch, request.n_batch)
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = request.kv_unified
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = FLASH_ATTN_TYPES[request.flash_attn]
        cparams.type_k = KV_TYPE_IDS[request.type_k]
        cparams.type_v = KV_TYPE_IDS[request.type_v]
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise PeregrineError(
                "llama.cpp could not create the context "
                f"(n_ctx {request.n_ctx}, K {request.type_k}, V {request.type_v}, "
                f"flash attention {request.flash_attn}): not enough memory, or a "
                "quantized V cache without flash attention"
            )
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        # Cells one sequence may use: all of them in a unified cache, else its share.
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        # llama.cpp clamps n_batch (to n_ctx, among others): a decode of more
        # tokens than it allows aborts the process, so use its figure.
        self.n_batch = max(1, int(llama_cpp.llama_n_batch(ctx)))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.threads = threads
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, n_seq_max)
        self._batch_capacity = self.n_batch
        self._pieces: dict[int, bytes] = {}
        self._grammar_tokenizer: Any = None
        self._piece_buf = ctypes.create_string_buffer(256)
        self.memory_report = log_capture.memory_since(mark) if log_capture else MemoryReport()
        self.has_recurrent_state = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        self.mtp: MtpContext | None
        self.mtp_reason: str | None  # why the heads are not drafting (None: they are, or none)
        self.mtp, self.mtp_reason = attach_mtp(self, self.mtp_plan)
        if self.mtp is not None and log_capture:
            self.memory_report = log_capture.memory_since(mark)

    # --- metadata -----------------------------------------------------------------

    @property
    def mtp_heads(self) -> int:
        """MTP (NextN) blocks the file carries, used or not."""
        return self.mtp_plan.heads

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        text = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    @property
    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest text one token stands for: bounds how many bytes fit the context."""
        return max(
            (
                len(llama_cpp.llama_vocab_get_text(self.vocab, t) or b"")
                for t in range(self.n_vocab)
            ),
            default=1,
        )

    @functools.cached_property
    def end_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (eos, eot, ...)."""
        return tuple(t for t in range(self.n_vocab) if self.is_eog(t))

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer for this vocabulary, built on first use (about 0.5 s)."""
        if self._grammar_tokenizer is None:
            from engine.structured.constraint import grammar_tokenizer

            self._grammar_tokenizer = grammar_tokenizer(self.vocab, self.end_tokens)
        return self._grammar_tokenizer

    @functools.cached_property
    def control_texts(self) -> frozenset[str]:
        """The texts of control tokens ("<|im_end|>"...), which user text must not become."""
        texts = set()
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_control(self.vocab, token):
                text = self.token_text(token)
                if text:
                    texts.add(text)
        return frozenset(texts)

    def vocab_fingerprint(self) -> str:
        """A hash of every token's text: equal fingerprints mean drafts are interchangeable."""
        digest = hashlib.sha256()
        for token in range(self.n_vocab):
            text = llama_cpp.llama_vocab_get_text(self.vocab, token) or b""
            digest.update(len(text).to_bytes(4, "little") + text)
        return digest.hexdigest()

    # --- sampling -----------------------------------------------------------------

    def sampler(self, params: SamplingParams) -> SamplerChain:
        """A sampler chain for one request, reading this model's output rows."""
        return SamplerChain(params, self.n_vocab, self.n_ctx, ctx=self.ctx)

    def greedy_sampler(self) -> SamplerChain:
        # No penalties, so the penalty window (n_ctx) plays no part.
        return SamplerChain(SamplingParams(temperature=0.0), self.n_vocab, ctx=self.ctx)

    # --- text <-> tokens ----------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
            if n < 0:
                raise PeregrineError("the prompt could not be tokenized")
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to (control tokens render to nothing)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        piece = bytes(buf.raw[: max(n, 0)])
        self._pieces[token] = piece
        return piece

    # --- evaluation ---------------------------------------------------------------

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq_max:
            raise DecodeError(f"sequence id {seq} outside 0..{self.n_seq_max - 1}")

    def decode(
        self, seq: int, tokens: Sequence[int], pos0: int, *, logits_all: bool = False
    ) -> float:
        """Evaluates tokens of sequence `seq` at positions pos0.., returning the wall time in ms.

        Logits are kept for the last token only, or for every row when
        `logits_all` (the verify step of speculative decoding). Inputs longer
        than n_batch are split; with `logits_all` they must fit one batch.
        """
        if logits_all and len(tokens) > self._batch_capacity:
            raise DecodeError("verify batch larger than n_batch")
        self._check_seq(seq)
        ms = 0.0
        step = self._batch_capacity
        for offset in range(0, len(tokens), step):
            chunk = tokens[offset : offset + step]
            ms += self.decode_batch([BatchPart(seq, chunk, pos0 + offset, logits_all)])
        return ms

    def decode_batch(self, parts: Sequence[BatchPart]) -> float:
        """Evaluates several sequences' tokens in one llama_decode; the wall time in ms.

        The rows of part p start at the sum of the earlier parts' lengths:
        that is the row index its logits are read and sampled from. The parts
        must fit one batch (n_batch tokens). Raises ContextFull when the KV
        cache has no room (llama.cpp then changed nothing).
        """
        total = sum(len(p.tokens) for p in parts)
        if total > self._batch_capacity:
            raise DecodeError(f"batch of {total} tokens larger than n_batch")
        if total == 0:
            return 0.0
        start = time.perf_counter()
        batch = self._batch
        token, pos, n_seq_id, seq_id, logits = (
            batch.token,
            batch.pos,
            batch.n_seq_id,
            batch.seq_id,
            batch.logits,
        )
        i = 0
        for part in parts:
            seq = part.seq
            self._check_seq(seq)
            p = part.pos0
            keep = part.logits_all
            for t in part.tokens:
                token[i] = t
                pos[i] = p
                n_seq_id[i] = 1
                seq_id[i][0] = seq
                logits[i] = keep
                i += 1
                p += 1
            if part.tokens:
                logits[i - 1] = True
        batch.n_tokens = total
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1:
            raise ContextFull("the context is full")
        if rc != 0:
            raise DecodeError(f"llama_decode failed ({rc})")
        if self.mtp is not None:
            row = 0
            for part in parts:
                self.mtp.decoded(part.seq, part.tokens, part.pos0, first_row=row)
                row += len(part.tokens)
        return (time.perf_counter() - start) * 1000.0

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Drops the KV cells of `seq` at positions [p0, p1) (p1 < 0: to the end).

        False if llama.cpp refused (recurrent memory cannot always cut mid-sequence).
        """
        self._check_seq(seq)
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def truncate(self, seq: int, n_keep: int) -> bool:
        """Drops every KV cell of `seq` at position >= n_keep. False if llama.cpp refused."""
        return self.seq_rm(seq, n_keep, -1)

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int = -1) -> None:
        """Makes `dst` share the cells of `src` at positions [p0, p1) (no copy of the data)."""
        self._check_seq(src)
        self._check_seq(dst)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self) -> None:
        """Empties every sequence."""
        llama_cpp.llama_memory_clear(self.memory, True)
        if self.mtp is not None:
            self.mtp.forget(None)

    def pos_max(self, seq: int) -> int:
        self._check_seq(seq)
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq))

    # --- sequence state (per-chat KV snapshots) -----------------------------------

    def state_size(self, seq: int) -> int:
        """Bytes save_state(seq) would take now (cheap: nothing is copied)."""
        self._check_seq(seq)
        return int(llama_cpp.llama_state_seq_get_size(self.ctx, seq))

    def save_state(self, seq: int) -> bytearray:
        size = self.state_size(seq)
        # One copy only: llama.cpp writes straight into the bytearray's buffer.
        data = bytearray(size)
        buf = (ctypes.c_uint8 * size).from_buffer(data)
        written = int(llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq))
        del buf  # release the export so the bytearray can be resized
        if written < size:
            del data[written:]
        return data

    def restore_state(self, seq: int, data: bytes | bytearray) -> bool:
        """Replaces sequence `seq` with a saved state. False if llama.cpp refused it."""
        self._empty(seq)
        if self.mtp is not None:
            self.mtp.forget(seq)
        array = ctypes.c_uint8 * len(data)
        # A bytearray is lent as it is (llama.cpp only reads it): no second copy.
        buf = (
            array.from_buffer(data) if isinstance(data, bytearray) else array.from_buffer_copy(data)
        )
        read = int(llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq))
        del buf
        if read == 0:
            self._empty(seq)
            return False
        return True

    def _empty(self, seq: int) -> None:
        # With one sequence, clearing the whole memory is the same and resets its buffers.
        if self.n_seq_max == 1:
            self.clear()
        else:
            self.seq_rm(seq, -1, -1)

    def logits(self, row: int) -> NDArray[np.float32]:
        """Output row `row`'s raw logits (-1: the last), a view into llama.cpp's buffer.

        Valid until the next decode; writing to it changes what the next
        sample of that row sees (how a grammar masks tokens).
        """
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        if not ptr:
            raise DecodeError(f"no logits for output row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        mtp = getattr(self, "mtp", None)
        if mtp is not None:
            mtp.close()
            self.mtp = None
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; `temperature <= 0` means greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    # (token, bias) pairs added to the logits first in the chain (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class SamplerChain:
    """A llama.cpp sampler chain built from SamplingParams, freed on close.

    This is the one place where a request's sampling becomes a llama.cpp chain
    (logit bias first); the grammar and logprobs wrap it in
    engine/decoding/sampling.py. `sample` reads an output row of the context it
    was made for (`LlamaModel.sampler`); `pick` runs the chain over given logits.
    """

    def __init__(
        self, params: SamplingParams, n_vocab: int, n_ctx: int = 1 << 20, *, ctx: Any = None
    ) -> None:
        self._ctx = ctx
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        # -1 means the whole context, as in llama-server (llama.cpp itself would
        # clamp it to 0, turning the penalty off); larger windows are the context.
        last_n = n_ctx if params.repeat_last_n < 0 else min(params.repeat_last_n, n_ctx)
        self.handle = chain
        self.n_vocab = n_vocab
        self.greedy = params.greedy
        self._candidates: Any = None
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                *(llama_cpp.llama_logit_bias(t, b) for t, b in params.logit_bias)
            )
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases)
            )
        penalize = (
            params.repeat_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        )
        if penalize:
            llama_cpp.llama_sampler_chain_add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_k(params.top_k)
            )
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
            )
        if params.min_p > 0.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1)
            )
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_temp(params.temperature)
        )
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)
        )

    def sample(self, row: int) -> int:
        """Samples (and accepts into the chain) a token from output row `row` (-1: the last).

        The row is the index, in the last decoded batch, of a token that kept
        its logits.
        """
        return int(llama_cpp.llama_sampler_sample(self.handle, self._ctx, row))

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.handle, token)

    def _candidates_for(self, logits: NDArray[np.float32]) -> tuple[Any, Any]:
        """llama.cpp's candidate array over `logits`, and a numpy view of it."""
        if self._candidates is None:
            data = (llama_cpp.llama_token_data * self.n_vocab)()
            view = np.ctypeslib.as_array(data).view(
                np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            )
            self._candidates = (data, view, np.arange(self.n_vocab, dtype=np.int32))
        data, view, ids = self._candidates
        view["id"] = ids  # samplers reorder the array in place
        view["logit"] = logits
        view["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(data, self.n_vocab, -1, False)
        return cur, view

    def pick(self, logits: NDArray[np.float32]) -> int:
        """Runs the chain over `logits` and returns its choice, without accepting it.

        What `llama_sampler_sample` does, minus the accept: the caller decides
        (a grammar may reject the token and ask again over masked logits).
        """
        cur, _view = self._candidates_for(logits)
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise DecodeError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def distribution(
        self, logits: NDArray[np.float32]
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The distribution the chain's final draw picks from, over `logits`.

        Every sampler but the last (bias, penalties, top-k/top-p/min-p,
        temperature) is applied, as `pick` would, and nothing is drawn or
        accepted. Returns the candidate tokens and their weights (not
        normalised); a greedy chain puts all weight on its choice.
        """
        cur, view = self._candidates_for(logits)
        n = int(llama_cpp.llama_sampler_chain_n(self.handle))
        for i in range(n - 1):
            stage = llama_cpp.llama_sampler_chain_get(self.handle, i)
            llama_cpp.llama_sampler_apply(stage, ctypes.byref(cur))
        data, _view, _ids = self._candidates
        size = int(cur.size)
        if size <= 0:
            raise DecodeError("the sampler chain left no candidate token")
        if ctypes.addressof(cur.data.contents) != ctypes.addressof(data):
            raise DecodeError("a sampler moved the candidate array")
        ids = view["id"][:size].astype(np.int64)
        raw = view["logit"][:size].astype(np.float64)
        if self.greedy:
            # llama.cpp's greedy sampler takes the first highest logit.
            return ids[int(np.argmax(raw)) : int(np.argmax(raw)) + 1], np.ones(1)
        # What llama.cpp's dist sampler draws from: a softmax of what is left.
        weights = np.exp(raw - np.max(raw))
        return ids, weights

    def close(self) -> None:
        if self.handle is not None:
            llama_cpp.llama_sampler_free(self.handle)
            self.handle = None
