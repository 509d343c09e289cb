"""Multi-token-prediction (MTP) heads: the MTP context beside a target model.

Models such as GLM-4.5 carry NextN blocks after their trunk: fed the
target's hidden state at position p-1 and the token at p, a block predicts
the token at p+1. llama.cpp runs them in a second context of the same model
(`ctx_type=LLAMA_CONTEXT_TYPE_MTP`) with its own KV cache for the NextN layer.

How the pieces meet (docs/architecture.md, "MTP heads"):

- The model is loaded with `load_mtp=True`; `llama_model_n_layer_nextn` must
  then read > 0. Both are checked: without `load_mtp` the count still reads 1
  from metadata, the NextN tensors are skipped, and creating an MTP context
  aborts the process.
- The target outputs a hidden-state row for every batch row
  (`llama_set_embeddings_nextn(target, true, false)`); after each of its
  decodes (`MtpContext.decoded`, called by `LlamaModel.decode`) the MTP
  context is fed the same tokens, each with the previous position's hidden
  state, as one batch carrying both `token` and `embd`. A token-only batch
  would be accepted and silently ignore the hidden state.
- Drafting starts from the last sampled token and the hidden state of the
  position before it; each further draft chains on the MTP context's own
  output row (`llama_get_embeddings_nextn_ith(mtp, 0)`). Each draft token is
  picked from the head's logits by the caller (greedily, or drawn like the
  request samples: engine/speculative/mtp.py). Draft rows are then cut off
  again with `llama_memory_seq_rm`, as the target's rejected rows are.

The hidden-state functions are bound only in `llama_cpp.llama_cpp_ext`,
which llama-cpp-python marks private: every use goes through `MtpBindings`,
and where they are missing the model serves without MTP and says why.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from numpy.typing import NDArray

from engine.planning.estimate import MTP_ARCHITECTURES
from engine.wire.base import KV_TYPE_IDS

if TYPE_CHECKING:
    from engine.backend.llama import LlamaModel, SamplerChain, SamplingParams

# Picks a draft token from an MTP head's logits (a view valid until the next decode).
Pick = Callable[[NDArray[np.float32]], int]

# Hidden-state rows kept per sequence from the target's last decode: enough for
# the longest verify batch (16 drafts + the pending token).
MAX_KEPT_ROWS = 17


@dataclass(frozen=True)
class MtpBindings:
    """The private llama.cpp functions MTP needs, found once per process."""

    set_embeddings_nextn: Callable[[Any, bool, bool], None]
    get_embeddings_nextn: Callable[[Any], Any]
    get_embeddings_nextn_ith: Callable[[Any, int], Any]


def find_bindings() -> MtpBindings | str:
    """The MTP bindings of this llama-cpp-python, or why they are unavailable."""
    try:
        from llama_cpp import llama_cpp_ext
    except (ImportError, AttributeError, OSError) as exc:
        # The module raises AttributeError at import when a symbol is missing.
        return f"this llama-cpp-python has no MTP bindings ({exc})"
    names = (
        "llama_set_embeddings_nextn",
        "llama_get_embeddings_nextn",
        "llama_get_embeddings_nextn_ith",
    )
    missing = [n for n in names if not callable(getattr(llama_cpp_ext, n, None))]
    if missing:
        return "this llama-cpp-python lacks " + ", ".join(missing)
    return MtpBindings(
        llama_cpp_ext.llama_set_embeddings_nextn,
        llama_cpp_ext.llama_get_embeddings_nextn,
        llama_cpp_ext.llama_get_embeddings_nextn_ith,
    )


def mtp_refusal(arch: str, nextn_layers: int, *, wanted: bool) -> str | None:
    """Why MTP heads described by a GGUF header won't be loaded (None: load them).

    Checked before loading: heads that can't be used are not worth their memory.
    """
    if nextn_layers <= 0:
        return "the model has no MTP heads"
    if arch not in MTP_ARCHITECTURES:
        return (
            f"MTP heads of {arch} models need a KV cache Peregrine can't roll back "
            "(MLA, sliding window or recurrent state); only glm4moe's are supported"
        )
    if not wanted:
        return "MTP heads turned off at load"
    return None


@dataclass
class _SeqState:
    """What the MTP context knows of one sequence."""

    n_fed: int = 0  # the MTP KV holds positions [0, n_fed) (or a suffix of them)
    rows_pos0: int = 0  # position of the first kept hidden-state row
    rows: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 0), np.float32))


class MtpContext:
    """The MTP context of a loaded model: fed by every target decode, drafts on request.

    Driven from the decode thread only, like the target. One MTP sequence per
    target sequence (slot).
    """

    def __init__(self, target: LlamaModel, bindings: MtpBindings) -> None:
        self.target = target
        self.api = bindings
        self.n_layer_nextn = int(llama_cpp.llama_model_n_layer_nextn(target.model))
        n_embd = int(llama_cpp.llama_model_n_embd_out(target.model))
        self.n_embd = n_embd if n_embd > 0 else int(llama_cpp.llama_model_n_embd(target.model))
        request = target.request
        cparams = llama_cpp.llama_context_default_params()
        cparams.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
        cparams.n_ctx = target.n_ctx
        # Holds a whole target chunk (fed after each target decode), and so the drafts plus one.
        cparams.n_batch = target.n_batch
        cparams.n_ubatch = min(request.n_ubatch, target.n_batch)
        cparams.n_seq_max = target.n_seq_max
        cparams.n_threads = target.threads
        cparams.n_threads_batch = target.threads
        cparams.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[request.flash_attn]
        cparams.type_k = KV_TYPE_IDS[request.type_k]
        cparams.type_v = KV_TYPE_IDS[request.type_v]
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(target.model, cparams)
        if not ctx:
            raise MemoryError("llama.cpp could not create the MTP context")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_batch = int(llama_cpp.llama_n_batch(ctx))
        self.n_vocab = target.n_vocab
        # A batch with both inputs: llama_batch_init allocates `embd` only when
        # asked for embeddings, so the token array is our own.
        self._batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, target.n_seq_max)
        self._tokens = (llama_cpp.llama_token * self.n_batch)()
        self._batch.token = self._tokens
        self._embd: NDArray[np.float32] = np.ctypeslib.as_array(
            self._batch.embd, shape=(self.n_batch, self.n_embd)
        )
        self._seqs = [_SeqState() for _ in range(target.n_seq_max)]
        self._zero = np.zeros(self.n_embd, np.float32)
        self.decode_ms = 0.0
        self.refusals = 0  # rollbacks llama.cpp refused (each restarts a sequence)
        bindings.set_embeddings_nextn(ctx, True, True)
        bindings.set_embeddings_nextn(target.ctx, True, False)

    # --- feeding (after every target decode) ----------------------------------------

    def decoded(self, seq: int, tokens: Sequence[int], pos0: int, first_row: int = 0) -> None:
        """Feeds the MTP context what the target just decoded of `seq` at pos0..

        The tokens are rows first_row.. of the target's last batch (a batch of
        several sequences calls this once per sequence).
        """
        n = len(tokens)
        ptr = self.api.get_embeddings_nextn(self.target.ctx)
        if not ptr or n == 0:
            return
        rows = np.ctypeslib.as_array(ptr, shape=(first_row + n, self.n_embd))[first_row:]
        state = self._seqs[seq]
        prev = self._row(state, pos0 - 1)
        if state.n_fed != pos0 and not (state.n_fed > pos0 and self._seq_rm(seq, pos0)):
            # The target's cache came from elsewhere (a restored state), or the
            # cut was refused: start this sequence afresh here. Drafts are weaker
            # until it fills; the output never changes (the target verifies).
            self._seq_rm(seq, 0)
            state.n_fed, prev = pos0, None
        self._fill(seq, tokens, pos0, prev, rows)
        state.n_fed = pos0 + n
        keep = min(n, MAX_KEPT_ROWS)
        state.rows = rows[n - keep :].copy()
        state.rows_pos0 = pos0 + n - keep

    def forget(self, seq: int | None) -> None:
        """The target's cache of `seq` (None: every sequence) was replaced or emptied."""
        for i in range(len(self._seqs)):
            if seq is None or i == seq:
                self._seq_rm(i, 0)
                self._seqs[i] = _SeqState()

    def _row(self, state: _SeqState, pos: int) -> NDArray[np.float32] | None:
        i = pos - state.rows_pos0
        if pos < 0 or not 0 <= i < len(state.rows):
            return None
        return state.rows[i]

    def _fill(
        self,
        seq: int,
        tokens: Sequence[int],
        pos0: int,
        prev: NDArray[np.float32] | None,
        rows: NDArray[np.float32],
    ) -> None:
        batch, embd = self._batch, self._embd
        for i, token in enumerate(tokens):
            self._tokens[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = False
        embd[0] = self._zero if prev is None else prev
        embd[1 : len(tokens)] = rows[: len(tokens) - 1]
        batch.n_tokens = len(tokens)
        self._decode()

    def _decode(self) -> None:
        start = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        self.decode_ms += (time.perf_counter() - start) * 1000.0
        if rc != 0:
            raise RuntimeError(f"the MTP context's decode failed ({rc})")

    def _seq_rm(self, seq: int, p0: int) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, -1))

    # --- drafting -----------------------------------------------------------------

    def sampler(self, params: SamplingParams) -> SamplerChain:
        """A sampler chain over this model's vocabulary, for drawing drafts like a request."""
        return self.target.sampler(params)

    def draft(
        self, seq: int, token: int, n_past: int, k: int, pick: Pick | None = None
    ) -> tuple[list[int], list[float]]:
        """Up to k drafts after `token`, the last sampled token, at position n_past.

        Each draft is `pick(logits)` of the head's output (the argmax without
        `pick`), and the next one chains on it. The target's cache must hold
        exactly the n_past tokens before it. Returns the drafts and the MTP
        head's own probability of each (a softmax of the raw logits). Empty
        when the hidden state of position n_past - 1 is unknown (nothing
        decoded yet).
        """
        state = self._seqs[seq]
        h = self._row(state, n_past - 1)
        if k <= 0 or h is None or state.n_fed < n_past:
            return [], []
        if state.n_fed > n_past:
            if not self._seq_rm(seq, n_past):
                self._restart(seq)
                return [], []
            state.n_fed = n_past
        batch = self._batch
        out: list[int] = []
        probs: list[float] = []
        room = self.target.n_ctx - n_past - 1
        try:
            for i in range(min(k, room)):
                self._tokens[0] = token
                batch.pos[0] = n_past + i
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = seq
                batch.logits[0] = True
                self._embd[0] = h
                batch.n_tokens = 1
                self._decode()
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(self.ctx, 0), shape=(self.n_vocab,)
                )
                token = int(np.argmax(logits)) if pick is None else pick(logits)
                top = float(np.max(logits))
                probs.append(float(np.exp(logits[token] - top) / np.exp(logits - top).sum()))
                out.append(token)
                if i == k - 1 or self.target.is_eog(token):
                    break
                nxt = self.api.get_embeddings_nextn_ith(self.ctx, 0)
                if not nxt:
                    break
                h = np.ctypeslib.as_array(nxt, shape=(self.n_embd,)).copy()
        finally:
            # The drafts leave no trace: the pending token is fed with the verify batch.
            if not self._seq_rm(seq, n_past):
                self._restart(seq)
        return out, probs

    def _restart(self, seq: int) -> None:
        """Empties the MTP sequence; the next target decode starts it afresh."""
        self.refusals += 1
        self._seq_rm(seq, 0)
        self._seqs[seq] = _SeqState()

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            # The token array is ours: llama_batch_free must not free it.
            self._batch.token = ctypes.POINTER(llama_cpp.llama_token)()
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            self.api.set_embeddings_nextn(self.target.ctx, False, False)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None


@dataclass(frozen=True)
class MtpPlan:
    """Whether to load a model's MTP heads, decided from its GGUF header before loading."""

    heads: int  # NextN blocks the file carries (its metadata)
    load: bool
    reason: str | None  # why they are not used; None when they are loaded


def plan_mtp(path: str, *, wanted: bool) -> MtpPlan:
    """Reads the header of the GGUF at `path`: are its MTP heads worth loading?"""
    from engine.gguf.header import GGUFError, read_gguf_header

    try:
        header = read_gguf_header(path)
    except (GGUFError, OSError):
        return MtpPlan(0, False, None)  # the load itself will say what is wrong
    heads = header.nextn_layers
    reason = mtp_refusal(header.architecture or "unknown", heads, wanted=wanted)
    if heads <= 0:
        return MtpPlan(0, False, None)
    return MtpPlan(heads, reason is None, reason)


def attach_mtp(
    target: LlamaModel, plan: MtpPlan, bindings: MtpBindings | str | None = None
) -> tuple[MtpContext | None, str | None]:
    """The MTP context for a model loaded per `plan`, or None and why not."""
    if not plan.load:
        return None, plan.reason
    # The second check: with load_mtp the NextN tensors must really be there.
    if int(llama_cpp.llama_model_n_layer_nextn(target.model)) <= 0:
        return None, "llama.cpp loaded no MTP heads from this file"
    if target.has_recurrent_state:
        return None, "the model keeps recurrent state, which can't roll back rejected drafts"
    found = find_bindings() if bindings is None else bindings
    if isinstance(found, str):
        return None, found
    try:
        return MtpContext(target, found), None
    except MemoryError as exc:
        return None, str(exc)
