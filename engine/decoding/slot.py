"""A slot: one KV sequence, and the whole state of the request decoding into it.

The decoder hands a request to a slot (`start`), then drives it in steps
shared with the other slots: each step, `plan` says which tokens the slot
puts into the step's one batch (a chunk of its prompt; or, after emitting
its pending token, that token alone or followed by drafts to verify), the
decoder decodes every slot's rows in one `llama_decode`, and `commit` samples
the slot's own rows. Nothing about a request lives outside its slot.

Speculation is lossless: drafts are verified by engine/speculative/acceptance.py
against the target's logits for exactly the accepted prefix, and the request's
chain moves on with emitted tokens only (docs/architecture.md). Under a
grammar, drafts are also cut where the grammar would refuse them. A drafter
that fails is dropped for the rest of the request: it never fails the request.
"""

from __future__ import annotations

import codecs
import enum
import logging
from collections.abc import Callable, Sequence

from engine.backend.llama import BatchPart
from engine.decoding.model import Model
from engine.decoding.request import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenLogprob,
)
from engine.decoding.sampling import TokenSampler, sampler_for
from engine.speculative.acceptance import TokenDist, verify
from engine.speculative.controller import SpeculationController
from engine.speculative.drafters import Drafter, PrefillDrafter, SamplingDrafter

log = logging.getLogger("peregrine.slot")


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
    PREFILL = "prefill"  # evaluating the prompt, one chunk per step
    GENERATING = "generating"  # one decode per step
    DONE = "done"  # finished: `result()` (or `error`) holds the outcome until `release()`
    # Its cells were saved to host RAM when the shared cache filled up; it
    # resumes where it stopped once there is room again (`Decoder._resume`).
    PARKED = "parked"


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
        self.last_used = 0.0
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
        self.error: BaseException | None = None
        self.generated = 0
        self.max_tokens = 0
        # Sampled but not yet emitted nor in the KV cache.
        self.pending = -1
        self._todo: list[int] = []
        # Drafters still evaluating the prompt (after the target has).
        self._draft_todo: list[Drafter] = []
        self._t_start = 0.0
        self._t_first = 0.0
        # What the slot put into the current step's batch.
        self._part: BatchPart | None = None
        self._draft: list[int] = []
        self._source: Drafter | None = None
        self._dists: list[TokenDist] | None = None
        self._strength = 0
        # While PARKED: the sequence's saved state, its tokens, and the state to go back to.
        self._parked: tuple[bytearray, list[int], SlotState] | None = None
        # The pending token was emitted before the slot was parked: offer it, don't emit it again.
        self._pending_emitted = False

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
        self.state = SlotState.PREFILL
        self.stopper = StopMatcher(req.stop)
        self.logprobs = [] if req.top_logprobs is not None else None
        self.sampler = sampler_for(self.model, req)

    def set_prefix(self, n_keep: int) -> None:
        """Records that the first n_keep prompt tokens are in the cache already."""
        assert self.request is not None
        self.timings.cache_n = n_keep
        self._todo = self.request.prompt_tokens[n_keep:]
        self.timings.prompt_n = len(self._todo)

    def fail(self, error: BaseException) -> None:
        """Ends the request with an error; the slot's sequence is left as `tokens` says."""
        self.error = error
        self.state = SlotState.DONE

    def park(self, state: bytearray) -> None:
        """Sets the request aside: `state` holds its sequence (saved by the decoder,
        which then empties the cells). The step's rows it planned are dropped;
        a draft is proposed again after `unpark`."""
        assert self.state in (SlotState.PREFILL, SlotState.GENERATING)
        if self._part is not None and self.state is SlotState.GENERATING:
            self._pending_emitted = True
        self._part = None
        self._draft, self._source, self._dists = [], None, None
        self._parked = (state, list(self.tokens), self.state)
        self.state = SlotState.PARKED

    @property
    def parked_cells(self) -> int:
        """The cells a parked slot needs back."""
        return len(self._parked[1]) if self._parked is not None else 0

    def parked_state(self) -> bytearray:
        assert self._parked is not None
        return self._parked[0]

    def unpark(self) -> None:
        """The decoder restored the saved state into the sequence: carry on."""
        assert self._parked is not None
        _state, self.tokens, self.state = self._parked
        self._parked = None

    def release_parked(self) -> None:
        """A parked request ended (cancelled): its saved state is dropped."""
        self._parked = None

    def release(self) -> None:
        """Frees the request's sampler; the sequence's tokens stay for the next request."""
        if self.sampler is not None:
            self.sampler.close()
        self.sampler = None
        self.request = None
        self.on_text = _ignore
        self._part = None
        self._parked = None
        self.last_used = self.clock()
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

    @property
    def age_s(self) -> float:
        return self.clock() - self._t_start if self.request is not None else 0.0

    @property
    def age_key(self) -> float:
        """When the request was admitted: the largest is the youngest."""
        return self._t_start

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt_tokens) if self.request is not None else 0

    @property
    def prefill_left(self) -> int:
        return len(self._todo)

    # --- one step: plan the slot's rows, then commit what the batch computed ------

    def plan(self, budget: int) -> BatchPart | None:
        """The slot's rows for this step's batch, or None (it finished, or waits).

        A prefilling slot offers the next `budget` prompt tokens (none when
        the budget is 0); a generating one first emits its pending token, then
        offers it, followed by the drafts the controller wants verified (at
        most `budget` rows in all; the caller gives it at least one).
        """
        req = self.request
        self._part = None
        if req is None or self.state not in (SlotState.PREFILL, SlotState.GENERATING):
            return None
        if self.state is SlotState.PREFILL:
            if req.cancel.is_set():
                self.finish = "cancelled"
                self.state = SlotState.DONE
                return None
            if not self._todo:
                # The target has read the prompt; a drafter's own model reads it
                # now, one batch per step, outside the target's batch.
                self._prefill_drafter()
                return None
            if budget <= 0:
                return None
            chunk = self._todo[:budget]
            self._part = BatchPart(self.seq, chunk, len(self.tokens))
            return self._part
        if self._pending_emitted:
            self._pending_emitted = False  # streamed before the slot was parked
        elif self._take_pending():
            self._finish()
            return None
        draft, source, strength, dists = self._propose()
        draft = draft[: max(0, budget - 1)]
        self._draft, self._source, self._strength = draft, source, strength
        self._dists = dists[: len(draft)] if dists is not None else None
        self._part = BatchPart(
            self.seq, [self.pending, *draft], len(self.tokens), logits_all=bool(draft)
        )
        return self._part

    def commit(self, row0: int) -> None:
        """Takes the step's outcome: the slot's rows start at output row `row0`."""
        part = self._part
        self._part = None
        if part is None:
            return
        if self.state is SlotState.PREFILL:
            self._prefilled(len(part.tokens), row0 + len(part.tokens) - 1)
        elif self._draft:
            if self._verified(row0):
                self._finish()
        else:
            assert self.sampler is not None
            self.tokens.append(self.pending)
            self.pending = self.sampler.sample(row0)

    def withdraw(self) -> None:
        """The step's batch was decoded without this slot's rows: forget them."""
        if self._part is not None and self.state is SlotState.GENERATING:
            # The pending token was emitted already: generation cannot resume.
            self.fail(RuntimeError("the slot's step was not decoded"))
        self._part = None

    # --- prompt -------------------------------------------------------------------

    def _prefilled(self, n: int, last_row: int) -> None:
        req, model = self.request, self.model
        assert req is not None and self.sampler is not None
        self.tokens.extend(self._todo[:n])
        del self._todo[:n]
        if self._todo:
            return
        self.pending = self.sampler.sample(last_row)
        for drafter in self.drafters:
            if isinstance(drafter, SamplingDrafter):
                drafter.sample_like(req.sampling)
            drafter.reset(req.prompt_tokens)
        self.max_tokens = min(req.max_tokens, model.n_ctx_seq - len(req.prompt_tokens))
        n_max = max(0, min(req.speculative.n_max, 16, model.n_batch - 1))
        self._draft_todo = [d for d in self.drafters if isinstance(d, PrefillDrafter)]
        if not self._draft_todo or n_max <= 0:
            self._draft_todo = []
            self._start_generating()

    def _prefill_drafter(self) -> None:
        """Evaluates one batch of the prompt in a drafter's own model."""
        if not self._draft_todo:
            self._start_generating()
            return
        drafter = self._draft_todo[0]
        try:
            done = not isinstance(drafter, PrefillDrafter) or drafter.prefill(self.model.n_batch)
        except Exception as exc:
            self._drop(drafter, exc)
            done = True
        if done:
            self._draft_todo.pop(0)
        if not self._draft_todo:
            self._start_generating()

    def _start_generating(self) -> None:
        # Prompt time includes the drafters' reading of the prompt: both come
        # before the first token is streamed.
        self._t_first = self.clock()
        self.timings.prompt_ms = (self._t_first - self._t_start) * 1000.0
        self.state = SlotState.GENERATING

    def _drop(self, drafter: Drafter, exc: Exception) -> None:
        """Speculation with `drafter` ends for this request; the request goes on."""
        log.warning("drafter %s failed, not used for this request: %s", drafter.name, exc)
        if drafter in self.drafters:
            self.drafters.remove(drafter)

    # --- generation ---------------------------------------------------------------

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
        if self.generated >= self.max_tokens or len(self.tokens) + 1 >= self.model.n_ctx_seq:
            self.finish = "length"
            return True
        if self.request.cancel.is_set():
            self.finish = "cancelled"
            return True
        return False

    def _propose(self) -> tuple[list[int], Drafter | None, int, list[TokenDist] | None]:
        """The first non-empty draft in chain order that the controller wants verified.

        Under a grammar a draft is cut before its first token the grammar
        refuses: that token could never be accepted. A drafter that fails is
        dropped for the rest of the request.
        """
        ctl, sampler, req = self.controller, self.sampler, self.request
        assert sampler is not None and req is not None
        if not self.drafters:
            return [], None, 0, None
        # The controller is shared by the slots: set this request's limits first.
        spec = req.speculative
        ctl.n_max = max(0, min(spec.n_max, 16, self.model.n_batch - 1))
        ctl.n_min = max(0, min(spec.n_min, ctl.n_max))
        ctl.p_min = spec.p_min
        room = min(self.max_tokens - self.generated, self.model.n_ctx_seq - len(self.tokens) - 2)
        if room <= 0 or ctl.n_max <= 0:
            return [], None, 0, None
        for drafter in list(self.drafters):
            try:
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
                        if not ctl.pays(drafter):
                            # Probing would cost a catch-up of every token since its
                            # last draft: it leaves this request.
                            self.drafters.remove(drafter)
                        continue
                    proposal = drafter.propose(k)
                    ms_per_token = proposal.cost_ms / max(len(proposal.tokens), 1)
                    ctl.record_draft_cost(ms_per_token, drafter=drafter)
                    tokens = sampler.valid_draft(proposal.tokens)
            except Exception as exc:
                self._drop(drafter, exc)
                continue
            if tokens:
                dists = proposal.dists[: len(tokens)] if proposal.dists is not None else None
                return tokens, drafter, proposal.strength, dists
        return [], None, 0, None

    def _verified(self, row0: int) -> bool:
        """The verify rows [pending, d1..dk], from output row `row0`, judged by the
        acceptance rule the draft calls for (engine/speculative/acceptance.py).
        True when generation ends."""
        model, sampler, ctl = self.model, self.sampler, self.controller
        draft, source, strength, dists = self._draft, self._source, self._strength, self._dists
        assert sampler is not None and source is not None
        self._draft, self._source, self._dists = [], None, None
        self.tokens.append(self.pending)
        verdict = verify(_Rows(sampler, row0), draft, dists, sampler.rng)
        accepted, nxt = verdict.accepted, verdict.next_token
        self.tokens.extend(draft[:accepted])
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


class _Rows:
    """A sampler's view of one slot's verify rows: row i is output row row0 + i."""

    def __init__(self, sampler: TokenSampler, row0: int) -> None:
        self._sampler = sampler
        self._row0 = row0

    def sample(self, row: int) -> int:
        return self._sampler.sample(self._row0 + row)

    def distribution(self, row: int) -> TokenDist:
        return self._sampler.distribution(self._row0 + row)

    def accept(self, token: int, row: int) -> None:
        self._sampler.accept(token, self._row0 + row)


def _ignore(_text: str) -> None:
    pass
