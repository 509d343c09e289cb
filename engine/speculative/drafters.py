"""Drafters: guess the next tokens for the decoder to verify in one batch.

Every drafter has the same shape (`Drafter`): the decoder keeps it in step
with the accepted tokens (`reset`, `extend`) and asks it for up to k tokens
(`propose`). Drafters sit in an ordered chain (`build_chain`); the decoder
takes the first non-empty proposal the controller wants, and never names a
concrete drafter. Verification itself is `acceptance.py`'s: sample and
compare for drafts without distributions, speculative sampling for drafts
that say which distribution each token was drawn from.

Two optional abilities, found by `isinstance`: a `SamplingDrafter` draws its
tokens the way the request samples (and reports the distributions), and a
`PrefillDrafter` evaluates the prompt during prompt processing, in chunks,
so that its drafting cost is measured on drafting alone. The drafters that
run a model (a draft model, MTP heads) draw through one `DraftSampling`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from engine.backend.llama import SamplingParams
from engine.backend.tokens import common_prefix
from engine.speculative.acceptance import TokenDist

log = logging.getLogger("peregrine.drafters")

if TYPE_CHECKING:
    from engine.speculative.mtp import MtpHeads

# The sequence a draft model keeps its own KV cache in (its context is its own).
DRAFT_SEQ = 0


@dataclass(frozen=True)
class Draft:
    """Up to k proposed tokens.

    `strength` is the drafter's own confidence signal (the n-gram match
    length; 0 where a drafter has none): the controller keeps acceptance
    statistics per (drafter, strength). `cost_ms` is the time the proposal
    took. `dists`, where a drafter drew its tokens from distributions, are
    those distributions, one per token (what speculative sampling needs);
    `probs` are the drawn tokens' probabilities in them. Both are None for a
    drafter without distributions (its drafts are verified by sample and
    compare).
    """

    tokens: list[int]
    strength: int = 0
    cost_ms: float = 0.0
    probs: list[float] | None = None
    dists: list[TokenDist] | None = None

    @staticmethod
    def drawn(tokens: list[int], dists: list[TokenDist] | None, cost_ms: float) -> Draft:
        """A costly drafter's tokens, with the distributions they were drawn from (or None)."""
        if dists is None:
            return Draft(tokens, cost_ms=cost_ms)
        probs = [d.prob(t) for d, t in zip(dists, tokens, strict=True)]
        return Draft(tokens, cost_ms=cost_ms, probs=probs, dists=dists)


class Drafter(Protocol):
    """What the decoder needs from a drafter.

    - `cheap`: proposing costs next to nothing, so the decoder asks for the
      most it could verify and the controller keeps as many as pay; a costly
      drafter (one that runs a model) is asked only for the k the controller
      chose beforehand, weighing the cost per drafted token it measured.
    - `prior(strength)`: the chance that a first draft token is accepted,
      assumed until the controller has measured it.
    - `reset(tokens)` starts a request with its prompt; `extend(tokens)` feeds
      every token accepted since (sampled or accepted from a draft), in order.
      A drafter that needs the target's hidden states after each verify decode
      (MTP heads) takes them alongside these tokens from the backend it holds.
    - `close` frees what the drafter holds (a draft model's sampler).
    """

    name: str
    cheap: bool

    def prior(self, strength: int) -> float: ...
    def reset(self, tokens: Sequence[int]) -> None: ...
    def extend(self, tokens: Sequence[int]) -> None: ...
    def propose(self, k: int) -> Draft: ...
    def close(self) -> None: ...


@runtime_checkable
class SamplingDrafter(Protocol):
    """A drafter that samples like the request (told before `reset`)."""

    def sample_like(self, params: SamplingParams) -> None: ...


@runtime_checkable
class PrefillDrafter(Protocol):
    """A drafter that evaluates the prompt during prompt processing.

    `prefill(limit)` evaluates at most `limit` more tokens of what `reset`
    gave it and returns True once it has caught up; `prefill_ms` is the time
    that took for the current request (kept out of its drafting cost).
    """

    prefill_ms: float

    def prefill(self, limit: int) -> bool: ...


class Sampler(Protocol):
    def sample(self, row: int) -> int: ...
    def distribution(
        self, logits: NDArray[np.float32]
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]: ...
    def close(self) -> None: ...


class DraftSampling:
    """How a drafter that runs a model draws its tokens like the request samples.

    Under a sampling request (`sample_like`), `draw(logits)` runs the
    request's chain over the drafter's logits (logit bias,
    top-k/top-p/min-p, temperature; not the penalties, which follow the
    target's history, not the drafter's) and draws from what is left with a
    generator of its own, seeded from the request's seed plus `stream` (each
    drafter has its own stream, none the verifier's). It returns the token
    and the distribution it was drawn from: speculative sampling needs that
    distribution. Under a greedy request `active` is False and the drafter
    picks greedily (q = 1 on its pick), verified by sample and compare.
    """

    def __init__(self, make_chain: Callable[[SamplingParams], Sampler], *, stream: int) -> None:
        self._make_chain = make_chain
        self.stream = stream
        self._chain: Sampler | None = None
        self._rng = np.random.default_rng()

    @property
    def active(self) -> bool:
        return self._chain is not None

    def sample_like(self, params: SamplingParams | None) -> None:
        """Draws like `params` from now on (None, or a greedy request: greedy drafts)."""
        self.close()
        if params is None or params.greedy:
            return
        self._chain = self._make_chain(
            dataclasses.replace(
                params, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0
            )
        )
        seed = None if params.seed is None else (params.seed + self.stream) % (1 << 64)
        self._rng = np.random.default_rng(seed)

    def draw(self, logits: NDArray[np.float32]) -> tuple[int, TokenDist]:
        """A token drawn from the chain's distribution over `logits`, and that distribution."""
        assert self._chain is not None, "draw() without a sampling request"
        ids, weights = self._chain.distribution(logits)
        dist = TokenDist.of(ids, weights)
        return dist.draw(float(self._rng.random())), dist

    def close(self) -> None:
        if self._chain is not None:
            self._chain.close()
            self._chain = None


class DraftModel(Protocol):
    """What a draft model must offer (LlamaModel implements it)."""

    n_ctx: int

    def decode(
        self, seq: int, tokens: Sequence[int], pos0: int, *, logits_all: bool = False
    ) -> float: ...
    def truncate(self, seq: int, n_keep: int) -> bool: ...
    def clear(self) -> None: ...
    def is_eog(self, token: int) -> bool: ...
    def greedy_sampler(self) -> Any: ...
    def sampler(self, params: SamplingParams) -> Any: ...
    def logits(self, row: int) -> NDArray[np.float32]: ...


def build_chain(
    draft_model: DraftModel | None = None, mtp: MtpHeads | None = None, *, seq: int = DRAFT_SEQ
) -> list[Drafter]:
    """The drafters in the order they are asked: the model's MTP heads when it has
    usable ones, n-gram lookup, then a draft model.

    Each slot has its own chain; `seq` is the slot's sequence (an MTP drafter
    drafts in it, and the draft model keeps that slot's tokens in it).
    """
    from engine.speculative.mtp import MtpDrafter

    chain: list[Drafter] = [MtpDrafter(mtp, seq)] if mtp is not None else []
    chain.append(NgramDrafter())
    if draft_model is not None:
        chain.append(DraftModelDrafter(draft_model, seq=seq))
    return chain


def model_drafter(chain: Sequence[Drafter], draft_model: object) -> Drafter | None:
    """The drafter in `chain` that drafts with `draft_model` (for status)."""
    return next((d for d in chain if getattr(d, "model", None) is draft_model), None)


class NgramDrafter:
    """Drafts by matching the longest recent suffix against the whole context.

    The index maps each n-gram (n_min..n_max) to the position right after its
    most recent earlier occurrence; it is updated per appended token in
    O(n_max - n_min) dictionary operations, so its cost per token does not grow
    with the context.
    """

    name = "ngram"
    cheap = True

    def __init__(self, n_min: int = 2, n_max: int = 8) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self.history: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max + 1)]

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = []
        self._index = [{} for _ in range(self.n_max + 1)]
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self._append(token)

    def _append(self, token: int) -> None:
        history = self.history
        length = len(history)
        # Every n-gram ending at the old last token now has a continuation at `length`.
        for n in range(self.n_min, min(self.n_max, length) + 1):
            self._index[n][tuple(history[length - n : length])] = length
        history.append(token)

    def prior(self, strength: int) -> float:
        # Longer matches are likelier to continue.
        return 0.6 + 0.06 * min(strength, 6)

    def propose(self, k: int) -> Draft:
        # A lookup takes microseconds: counted as free.
        tokens, match_len = self.draft(k)
        return Draft(tokens, match_len)

    def close(self) -> None:
        pass

    def draft(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the longest matching suffix, and that match's length."""
        history = self.history
        length = len(history)
        if k <= 0:
            return [], 0
        for n in range(min(self.n_max, length), self.n_min - 1, -1):
            start = self._index[n].get(tuple(history[length - n :]))
            if start is not None:
                # Continue the copied span; it may run into the suffix itself,
                # which is how repeated patterns get drafted.
                out: list[int] = []
                pos = start
                while len(out) < k and pos < length:
                    out.append(history[pos])
                    pos += 1
                return out, n
        return [], 0


class DraftModelDrafter:
    """Drafts with a small model that shares the target's vocabulary.

    Under a sampling request it draws each token from its own distribution
    after the request's chain (temperature, top-k/top-p/min-p, bias; not the
    penalties, which follow the target's history) and reports those
    distributions, so the target verifies by speculative sampling; greedy
    requests (or `sample=False`) get greedy drafts.

    It keeps its own KV cache in step with the accepted history: the prompt
    during prompt processing (`prefill`), then before each draft it trims
    what the target rejected and evaluates what it has not seen. Any failure
    empties that cache, so the next request starts it afresh.
    """

    name = "draft"
    cheap = False

    def __init__(
        self,
        model: DraftModel,
        *,
        sample: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        seq: int = DRAFT_SEQ,
    ) -> None:
        self.model = model
        self.seq = seq  # the draft model's sequence for this drafter's slot
        self.sample = sample
        self.clock = clock
        self.history: list[int] = []
        self._in_kv: list[int] = []
        self._greedy: Sampler = model.greedy_sampler()
        # The request's chain when it samples; the stream keeps the draws apart from MTP's.
        self._sampling = DraftSampling(model.sampler, stream=1)
        self._last_k = 0
        self.prefill_ms = 0.0

    def prior(self, strength: int) -> float:
        return 0.7

    def sample_like(self, params: SamplingParams) -> None:
        self._sampling.sample_like(params if self.sample else None)

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = list(tokens)
        self.prefill_ms = 0.0

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def _forget(self) -> None:
        """This slot's sequence may hold anything now: empty it, so nothing is trusted.

        Only this slot's sequence: the other slots' drafts live in the same model."""
        self._in_kv = []
        try:
            self.model.truncate(self.seq, 0)
        except Exception:
            log.exception("could not clear the draft model's sequence %d", self.seq)

    def _catch_up(self, limit: int | None) -> tuple[bool, int]:
        """Brings the cache toward the history: all of it (`limit` None; the last
        token's logits are then fresh) or at most `limit` tokens short of its last.
        Returns whether it got there, and how many tokens it evaluated."""
        try:
            n = len(self.history)
            keep = min(common_prefix(self._in_kv, self.history), n - 1)
            if keep < len(self._in_kv):
                if not self.model.truncate(self.seq, keep):
                    self.model.truncate(self.seq, 0)
                    keep = 0
                self._in_kv = self._in_kv[:keep]
            end = n if limit is None else min(n - 1, keep + limit)
            todo = self.history[keep:end]
            if todo:
                self.model.decode(self.seq, todo, keep)
                self._in_kv.extend(todo)
            return end >= (n if limit is None else n - 1), len(todo)
        except BaseException:
            self._forget()
            raise

    def prefill(self, limit: int) -> bool:
        if not self.history:
            return True
        start = self.clock()
        try:
            done, _ = self._catch_up(max(1, limit))
        finally:
            self.prefill_ms += (self.clock() - start) * 1000.0
        return done

    def propose(self, k: int) -> Draft:
        """Up to k tokens; `cost_ms` is what drafting them costs in step with the target."""
        if k <= 0 or not self.history:
            return Draft([])
        start = self.clock()
        _, caught_up = self._catch_up(None)
        mid = self.clock()
        out: list[int] = []
        dists: list[TokenDist] = []
        try:
            room = self.model.n_ctx - len(self._in_kv) - 1
            for i in range(min(k, room)):
                if self._sampling.active:
                    token, dist = self._sampling.draw(self.model.logits(-1))
                    dists.append(dist)
                else:
                    token = self._greedy.sample(-1)
                out.append(token)
                if self.model.is_eog(token) or i == k - 1:
                    break
                self.model.decode(self.seq, (token,), len(self._in_kv))
                self._in_kv.append(token)
        except BaseException:
            self._forget()
            raise
        end = self.clock()
        # In step, a draft first evaluates the tokens accepted since the last
        # one (at most that draft's k + 1). More is a backlog from steps that
        # did not draft: its time is scaled down to what being in step costs.
        in_step = self._last_k + 1
        share = 1.0 if caught_up <= in_step else in_step / caught_up
        self._last_k = len(out)
        cost_ms = ((mid - start) * share + (end - mid)) * 1000.0
        return Draft.drawn(out, dists if self._sampling.active else None, cost_ms)

    def close(self) -> None:
        self._greedy.close()
        self._sampling.close()
