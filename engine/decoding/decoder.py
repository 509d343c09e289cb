"""The engine's decoding loop: prefix reuse, sampling, speculative verification.

Runs on the engine's single decode thread. It keeps track of exactly which
tokens sit in the KV cache (sequence 0) so every request starts from the
longest common prefix with what is already there, or with a saved state of an
earlier conversation (`prefix_cache.py`).
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from engine.backend.llama import SamplingParams
from engine.decoding.prefix_cache import PrefixStateCache, common_prefix
from engine.decoding.sampling import TokenLogprob, TokenSampler
from engine.speculative.controller import DRAFT_MODEL_SIGNAL, SpeculationController
from engine.speculative.drafters import DraftModelDrafter, NgramDrafter
from engine.structured.constraint import Constraint

log = logging.getLogger("peregrine.decoder")

FinishReason = Literal["stop", "length", "cancelled"]
SpecType = Literal["auto", "none", "ngram", "draft", "mtp"]

# Don't bother saving a context this short when switching away from it.
MIN_STATE_TOKENS = 32


class Model(Protocol):
    """What the loop needs from a loaded model (LlamaModel implements it)."""

    n_ctx: int
    n_batch: int
    n_vocab: int
    has_recurrent_state: bool

    def decode(self, tokens: Sequence[int], pos0: int, *, logits_all: bool = False) -> float: ...
    def truncate(self, n_keep: int) -> bool: ...
    def clear(self) -> None: ...
    def state_size(self) -> int: ...
    def save_state(self) -> bytearray: ...
    def restore_state(self, data: bytes | bytearray) -> bool: ...
    def sample(self, sampler: object, row: int) -> int: ...
    def logits(self, row: int) -> NDArray[np.float32]: ...
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...
    def grammar_tokenizer(self) -> Any: ...

    @property
    def eos(self) -> int: ...


@dataclass(frozen=True)
class SpecParams:
    type: SpecType = "auto"
    n_max: int = 8
    n_min: int = 0
    p_min: float = 0.0


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    speculative: SpecParams = field(default_factory=SpecParams)
    cancel: threading.Event = field(default_factory=threading.Event)
    # A compiled llguidance grammar (engine/structured/schema.py) the answer must follow.
    grammar: str | None = None
    # None: no logprobs; 0..20: each token's logprob and that many alternatives.
    top_logprobs: int | None = None
    # Called with the logprobs of the tokens behind the text of the next on_text call.
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None


@dataclass
class Timings:
    """Per-request figures, with llama-server's names (docs/api.md)."""

    prompt_n: int = 0
    cache_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    draft_n: int = 0
    draft_n_accepted: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {
            "prompt_n": self.prompt_n,
            "cache_n": self.cache_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": _rate(self.prompt_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": _rate(self.predicted_n, self.predicted_ms),
            "draft_n": self.draft_n,
            "draft_n_accepted": self.draft_n_accepted,
        }


def _rate(n: int, ms: float) -> float:
    return round(n * 1000.0 / ms, 3) if ms > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    timings: Timings
    logprobs: list[TokenLogprob] | None = None


class StopMatcher:
    """Streams text while holding back anything that may begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class Decoder:
    """Owns the KV cache of one model and generates for one request at a time."""

    def __init__(
        self,
        model: Model,
        *,
        state_cache: PrefixStateCache,
        draft: DraftModelDrafter | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.state_cache = state_cache
        self.clock = clock
        # Exactly what sequence 0 holds, position by position: start from an
        # empty cache so the two can never disagree.
        model.clear()
        self.tokens: list[int] = []
        self.controller = SpeculationController()
        self.drafter = NgramDrafter()
        self.draft_drafter = draft
        self.last_drafter: str | None = None

    # --- prefix reuse -------------------------------------------------------------

    def _stash(self) -> None:
        if len(self.tokens) < MIN_STATE_TOKENS or self.model.has_recurrent_state:
            return
        # Saving copies the whole KV state: skip it when the cache could not keep
        # it anyway (--cache-ram 0, or a state larger than the budget).
        if not self.state_cache.can_hold(self.model.state_size() + 4 * len(self.tokens)):
            return
        self.state_cache.put(self.tokens, self.model.save_state())

    def _reset_context(self) -> None:
        self.model.clear()
        self.tokens = []

    def _reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Brings the KV cache to the longest usable prefix of `prompt`; returns its length."""
        n_live = common_prefix(self.tokens, prompt)
        saved, n_saved = self.state_cache.best_match(prompt)
        if saved is not None and n_saved > n_live + MIN_STATE_TOKENS // 2:
            self._stash()
            if self.model.restore_state(saved.data):
                self.tokens = list(saved.tokens)
                self.state_cache.touch(saved)
                n_live = n_saved
            else:
                log.warning("a saved KV state could not be restored; re-reading the prompt")
                self._reset_context()
                n_live = 0
        elif len(self.tokens) - n_live >= MIN_STATE_TOKENS:
            # Most of the context is about to go: keep it for a switch back.
            self._stash()
        # At least one prompt token must be evaluated to get logits.
        n_keep = min(n_live, len(prompt) - 1)
        if n_keep < len(self.tokens):
            if not self.model.truncate(n_keep):
                # Recurrent/hybrid memory cannot always cut mid-sequence.
                self._reset_context()
                n_keep = 0
            self.tokens = self.tokens[:n_keep]
        return n_keep

    def drop_context(self) -> None:
        """Forgets everything (used after a failed decode left the cache unknown)."""
        self._reset_context()

    # --- generation ---------------------------------------------------------------

    def generate(self, req: GenerationRequest, on_text: Callable[[str], None]) -> GenerationResult:
        model = self.model
        timings = Timings()
        t_start = self.clock()
        prompt = req.prompt_tokens
        constraint = (
            Constraint(model.grammar_tokenizer(), req.grammar, model.n_vocab)
            if req.grammar is not None
            else None
        )
        sampler = TokenSampler(
            model, req.sampling, constraint=constraint, top_logprobs=req.top_logprobs
        )
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopper = StopMatcher(req.stop)
        pieces: list[str] = []
        finish: FinishReason = "length"
        generated = 0
        logprobs: list[TokenLogprob] | None = [] if req.top_logprobs is not None else None
        held: list[TokenLogprob] = []  # logprobs of tokens whose text is not out yet

        def put_text(text: str) -> None:
            pieces.append(text)
            if held and logprobs is not None:
                logprobs.extend(held)
                if req.on_logprobs is not None:
                    req.on_logprobs(list(held))
                held.clear()
            on_text(text)

        def ended(token: int) -> bool:
            """An end-of-generation token: it takes its logprob record along, unsent."""
            if not model.is_eog(token):
                return False
            sampler.take_logprob()
            return True

        def emit(token: int) -> bool:
            """Streams one generated token; True when generation must end."""
            nonlocal finish
            record = sampler.take_logprob()
            if record is not None:
                held.append(record)
            text = stopper.feed(utf8.decode(model.piece(token)))
            if text:
                put_text(text)
            if stopper.stopped:
                finish = "stop"
                return True
            return False

        try:
            # Inside the try: a failed restore may leave another chat in the cache
            # than self.tokens says, and the handler below starts clean.
            n_keep = self._reuse_prefix(prompt)
            timings.cache_n = n_keep
            todo = prompt[n_keep:]
            timings.prompt_n = len(todo)
            # Prompt, in n_batch chunks with a cancellation check between them.
            chunk = model.n_batch
            for offset in range(0, len(todo), chunk):
                if req.cancel.is_set():
                    return self._result(pieces, "cancelled", generated, timings)
                part = todo[offset : offset + chunk]
                model.decode(part, len(self.tokens))
                self.tokens.extend(part)
            last = sampler.sample(-1)
            t_first = self.clock()
            timings.prompt_ms = (t_first - t_start) * 1000.0

            # Rolling back rejected drafts needs a KV cache that can be cut
            # mid-sequence: recurrent/hybrid models decode plainly.
            can_speculate = not model.has_recurrent_state
            spec_type = req.speculative.type
            use_ngram = can_speculate and spec_type in ("auto", "ngram")
            draft_model = self.draft_drafter if spec_type in ("auto", "draft") else None
            if not can_speculate:
                draft_model = None
            ctl = self.controller
            ctl.n_max = max(0, min(req.speculative.n_max, 16, model.n_batch - 1))
            ctl.n_min = max(0, min(req.speculative.n_min, ctl.n_max))
            ctl.p_min = req.speculative.p_min
            drafters: list[NgramDrafter | DraftModelDrafter] = []
            if use_ngram:
                drafters.append(self.drafter)
            if draft_model is not None:
                drafters.append(draft_model)
            for drafter in drafters:
                drafter.reset(prompt)
            if drafters:
                self.last_drafter = "+".join(d.name for d in drafters)
            max_tokens = min(req.max_tokens, model.n_ctx - len(prompt))

            while True:
                # `last` has been sampled but is not in the KV cache yet.
                generated += 1
                if ended(last):
                    finish = "stop"
                    break
                if emit(last):
                    break
                if sampler.finished:
                    # `last` completed the grammar (it is always the latest token sampled).
                    finish = "stop"
                    break
                for drafter in drafters:
                    drafter.extend((last,))
                if generated >= max_tokens or len(self.tokens) + 1 >= model.n_ctx:
                    finish = "length"
                    break
                if req.cancel.is_set():
                    finish = "cancelled"
                    break

                room = min(max_tokens - generated, model.n_ctx - len(self.tokens) - 2)
                draft: list[int] = []
                match_len = 0
                if use_ngram and room > 0 and ctl.n_max > 0:
                    draft, match_len = self.drafter.draft(min(ctl.n_max, room))
                    draft = sampler.valid_draft(draft)
                    draft = draft[: ctl.choose(match_len, len(draft))]
                if not draft and draft_model is not None and room > 0 and ctl.n_max > 0:
                    # A draft model costs a decode per drafted token: the
                    # controller weighs that too before asking for any.
                    k = ctl.choose(DRAFT_MODEL_SIGNAL, min(ctl.n_max, room), ctl.draft_cost())
                    if k:
                        draft, ms_per_token = draft_model.draft(k)
                        ctl.record_draft_cost(ms_per_token)
                        # A draft token the grammar forbids could never be accepted.
                        draft = sampler.valid_draft(draft)
                        match_len = DRAFT_MODEL_SIGNAL

                pos = len(self.tokens)
                if not draft:
                    ms = model.decode((last,), pos)
                    ctl.record_cost(1, ms)
                    self.tokens.append(last)
                    last = sampler.sample(-1)
                    continue

                # Verify: one batch [last, d1..dk], every row sampled in order by
                # the request's own chain; accept while the sample equals the draft.
                batch = [last, *draft]
                ms = model.decode(batch, pos, logits_all=True)
                ctl.record_cost(len(batch), ms)
                self.tokens.append(last)
                accepted = 0
                nxt = sampler.sample(0)
                while accepted < len(draft) and nxt == draft[accepted]:
                    self.tokens.append(draft[accepted])
                    accepted += 1
                    nxt = sampler.sample(accepted)
                timings.draft_n += len(draft)
                timings.draft_n_accepted += accepted
                ctl.record(match_len, len(draft), accepted)
                if accepted < len(draft) and not model.truncate(len(self.tokens)):
                    raise RuntimeError("llama.cpp refused to roll back rejected draft tokens")
                # Stream the accepted drafts (already in the KV cache) one by one.
                stop_now = False
                for token in draft[:accepted]:
                    generated += 1
                    if ended(token):
                        finish, stop_now = "stop", True
                        break
                    if emit(token):
                        stop_now = True
                        break
                    for drafter in drafters:
                        drafter.extend((token,))
                    if generated >= max_tokens:
                        finish, stop_now = "length", True
                        break
                if stop_now:
                    break
                last = nxt

            tail = stopper.flush() if not stopper.stopped else ""
            tail += utf8.decode(b"", final=True) if not stopper.stopped else ""
            if tail:
                put_text(tail)
            timings.predicted_n = generated
            timings.predicted_ms = (self.clock() - t_first) * 1000.0
            return self._result(pieces, finish, generated, timings, logprobs)
        except Exception:
            # The cache may hold half-evaluated tokens: start clean next time.
            self.drop_context()
            raise
        finally:
            sampler.close()

    @staticmethod
    def _result(
        pieces: list[str],
        finish: FinishReason,
        generated: int,
        timings: Timings,
        logprobs: list[TokenLogprob] | None = None,
    ) -> GenerationResult:
        return GenerationResult("".join(pieces), finish, generated, timings, logprobs)
