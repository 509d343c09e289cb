"""A slot: one KV sequence, and the whole state of the request decoding into it.

The decoder hands a request to a slot (`start`), then drives it: `prefill`
evaluates one batch of the prompt at a time, `step` emits the pending token
and runs one decode (a plain token, or a verify batch of drafts), until the
slot is `DONE`. Nothing about a request lives outside its slot, so several
slots can later share one batch per step (one sequence id each).

Speculation is lossless: every emitted token is sampled by the request's own
chain from the target's logits for exactly the accepted prefix; drafts only
decide which rows get computed in one batch (docs/architecture.md). Under a
grammar, drafts are also cut where the grammar would refuse them.
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Callable, Sequence

from engine.decoding.model import Model
from engine.decoding.request import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenLogprob,
)
from engine.decoding.sampling import TokenSampler, sampler_for
from engine.speculative.controller import SpeculationController
from engine.speculative.drafters import Drafter


class StopMatcher:
    """Streams text while holding back anything that may begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the answer

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.matched = min(
                (s for s in self.stops if s in self._pending), key=self._pending.find
            )
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


class SlotState(enum.Enum):
    IDLE = "idle"  # no request; the sequence keeps its tokens for the next one
    PREFILL = "prefill"  # evaluating the prompt, one batch per call
    GENERATING = "generating"  # one decode per step
    DONE = "done"  # finished: `result()` holds the answer until `release()`


class Slot:
    """One sequence of the model's KV cache and the request that owns it now."""

    def __init__(
        self,
        seq: int,
        model: Model,
        controller: SpeculationController,
        clock: Callable[[], float],
    ) -> None:
        self.seq = seq
        self.model = model
        self.controller = controller
        self.clock = clock
        # Exactly what the sequence holds, position by position.
        self.tokens: list[int] = []
        self.state = SlotState.IDLE
        self._reset_request()

    def _reset_request(self) -> None:
        self.request: GenerationRequest | None = None
        self.on_text: Callable[[str], None] = _ignore
        self.sampler: TokenSampler | None = None
        self.stopper = StopMatcher(())
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.drafters: list[Drafter] = []
        self.timings = Timings()
        self.pieces: list[str] = []
        # Logprobs of the answer's tokens (when asked for), and of those whose
        # text a stop string or an unfinished UTF-8 sequence still holds back.
        self.logprobs: list[TokenLogprob] | None = None
        self.held: list[TokenLogprob] = []
        self.finish: FinishReason = "length"
        self.generated = 0
        self.max_tokens = 0
        # Sampled but not yet emitted nor in the KV cache.
        self.pending = -1
        self._todo: list[int] = []
        self._t_start = 0.0
        self._t_first = 0.0

    # --- lifecycle ----------------------------------------------------------------

    def start(
        self,
        req: GenerationRequest,
        on_text: Callable[[str], None],
        drafters: Sequence[Drafter] = (),
    ) -> None:
        """Takes a request and the drafters it may use (in chain order).

        The caller then brings `tokens` to a prefix of its prompt (`set_prefix`).
        """
        self._reset_request()
        self.request = req
        self.on_text = on_text
        self.drafters = list(drafters)
        self._t_start = self.clock()
        self.sampler = sampler_for(self.model, req)
        self.logprobs = [] if req.top_logprobs is not None else None
        self.stopper = StopMatcher(req.stop)
        self.state = SlotState.PREFILL

    def set_prefix(self, n_keep: int) -> None:
        """Records that the first n_keep prompt tokens are in the cache already."""
        assert self.request is not None
        self.timings.cache_n = n_keep
        self._todo = self.request.prompt_tokens[n_keep:]
        self.timings.prompt_n = len(self._todo)

    def release(self) -> None:
        """Frees the request's sampler; the sequence's tokens stay for the next request."""
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = None
        self.state = SlotState.IDLE

    def forget(self) -> None:
        """The cache no longer holds what `tokens` says (it was cleared)."""
        self.tokens = []

    def result(self) -> GenerationResult:
        return GenerationResult(
            "".join(self.pieces),
            self.finish,
            self.generated,
            self.timings,
            self.logprobs,
            stop_sequence=self.stopper.matched,
        )

    # --- prompt -------------------------------------------------------------------

    def prefill(self) -> None:
        """Evaluates the next batch of the prompt, with a cancellation check before it.

        After the last batch it samples the first token and readies speculation.
        """
        req, model = self.request, self.model
        assert req is not None and self.sampler is not None
        if req.cancel.is_set():
            self.finish = "cancelled"
            self.state = SlotState.DONE
            return
        part = self._todo[: model.n_batch]
        del self._todo[: model.n_batch]
        model.decode(self.seq, part, len(self.tokens))
        self.tokens.extend(part)
        if self._todo:
            return
        self.pending = self.sampler.sample(-1)
        self._t_first = self.clock()
        self.timings.prompt_ms = (self._t_first - self._t_start) * 1000.0

        ctl = self.controller
        spec = req.speculative
        ctl.n_max = max(0, min(spec.n_max, 16, model.n_batch - 1))
        ctl.n_min = max(0, min(spec.n_min, ctl.n_max))
        ctl.p_min = spec.p_min
        for drafter in self.drafters:
            drafter.reset(req.prompt_tokens)
        self.max_tokens = min(req.max_tokens, model.n_ctx - len(req.prompt_tokens))
        self.state = SlotState.GENERATING

    # --- generation ---------------------------------------------------------------

    def step(self) -> None:
        """Emits the pending token, then runs one decode: plain, or a verify batch."""
        if self._take_pending():
            self._finish()
            return
        draft, source, strength = self._propose()
        if not draft:
            self._decode_one()
        elif self._verify(draft, source, strength):
            self._finish()

    def _emit(self, token: int) -> bool:
        """Streams one generated token; True when generation must end."""
        assert self.sampler is not None
        self.generated += 1
        record = self.sampler.take_logprob()  # tokens come out in the order sampled
        if self.model.is_eog(token):
            self.finish = "stop"
            return True
        if record is not None:
            self.held.append(record)
        text = self.stopper.feed(self.utf8.decode(self.model.piece(token)))
        if text:
            self._put(text)
        if self.stopper.stopped:
            self.finish = "stop"
            return True
        for drafter in self.drafters:
            drafter.extend((token,))
        return False

    def _put(self, text: str) -> None:
        """Hands out a piece of the answer, with the logprobs of the tokens behind it."""
        assert self.request is not None
        self.pieces.append(text)
        if self.held and self.logprobs is not None:
            self.logprobs.extend(self.held)
            if self.request.on_logprobs is not None:
                self.request.on_logprobs(list(self.held))
            self.held.clear()
        self.on_text(text)

    def _take_pending(self) -> bool:
        """Emits the sampled token (not in the KV cache yet); True when generation ends."""
        assert self.request is not None and self.sampler is not None
        if self._emit(self.pending):
            return True
        if self.sampler.finished:
            # The pending token (always the latest sampled) completed the grammar.
            self.finish = "stop"
            return True
        if self.generated >= self.max_tokens or len(self.tokens) + 1 >= self.model.n_ctx:
            self.finish = "length"
            return True
        if self.request.cancel.is_set():
            self.finish = "cancelled"
            return True
        return False

    def _propose(self) -> tuple[list[int], Drafter | None, int]:
        """The first non-empty draft in chain order that the controller wants verified.

        Under a grammar a draft is cut before its first token the grammar
        refuses: that token could never be accepted.
        """
        ctl, sampler = self.controller, self.sampler
        assert sampler is not None
        room = min(self.max_tokens - self.generated, self.model.n_ctx - len(self.tokens) - 2)
        if room <= 0 or ctl.n_max <= 0:
            return [], None, 0
        for drafter in self.drafters:
            if drafter.cheap:
                proposal = drafter.propose(min(ctl.n_max, room))
                allowed = sampler.valid_draft(proposal.tokens)
                k = ctl.choose(proposal.strength, len(allowed), drafter=drafter)
                tokens = allowed[:k]
            else:
                # A costly drafter is asked only for what pays, its own cost weighed in.
                per_draft = ctl.draft_cost(drafter=drafter)
                k = ctl.choose(0, min(ctl.n_max, room), per_draft, drafter=drafter)
                if not k:
                    continue
                proposal = drafter.propose(k)
                ms_per_token = proposal.cost_ms / max(len(proposal.tokens), 1)
                ctl.record_draft_cost(ms_per_token, drafter=drafter)
                tokens = sampler.valid_draft(proposal.tokens)
            if tokens:
                return tokens, drafter, proposal.strength
        return [], None, 0

    def _decode_one(self) -> None:
        assert self.sampler is not None
        ms = self.model.decode(self.seq, (self.pending,), len(self.tokens))
        self.controller.record_cost(1, ms)
        self.tokens.append(self.pending)
        self.pending = self.sampler.sample(-1)

    def _verify(self, draft: list[int], source: Drafter | None, strength: int) -> bool:
        """One batch [pending, d1..dk], every row sampled in order by the request's
        chain, accepting while the sample equals the draft. True when generation ends."""
        model, sampler, ctl = self.model, self.sampler, self.controller
        assert sampler is not None and source is not None
        batch = [self.pending, *draft]
        ms = model.decode(self.seq, batch, len(self.tokens), logits_all=True)
        ctl.record_cost(len(batch), ms)
        self.tokens.append(self.pending)
        accepted = 0
        nxt = sampler.sample(0)
        while accepted < len(draft) and nxt == draft[accepted]:
            self.tokens.append(draft[accepted])
            accepted += 1
            nxt = sampler.sample(accepted)
        self.timings.draft_n += len(draft)
        self.timings.draft_n_accepted += accepted
        ctl.record(strength, len(draft), accepted, drafter=source)
        if accepted < len(draft) and not model.truncate(self.seq, len(self.tokens)):
            raise RuntimeError("llama.cpp refused to roll back rejected draft tokens")
        # Stream the accepted drafts (already in the KV cache) one by one.
        for token in draft[:accepted]:
            if self._emit(token):
                return True
            if self.generated >= self.max_tokens:
                self.finish = "length"
                return True
        self.pending = nxt
        return False

    def _finish(self) -> None:
        if not self.stopper.stopped:
            # Bytes of a character the answer stopped inside (a length cut in
            # the middle of an emoji) are dropped: sent, they would be U+FFFD.
            self.utf8.reset()
            tail = self.stopper.flush()
            if tail:
                self._put(tail)
        self.timings.predicted_n = self.generated
        self.timings.predicted_ms = (self.clock() - self._t_first) * 1000.0
        self.state = SlotState.DONE


def _ignore(_text: str) -> None:
    pass
