"""Drafters: guess the next tokens for the decoder to verify in one batch.

Every drafter has the same shape (`Drafter`): the decoder keeps it in step
with the accepted tokens (`reset`, `extend`) and asks it for up to k tokens
(`propose`). Drafters sit in an ordered chain (`build_chain`); the decoder
takes the first non-empty proposal the controller wants, and never names a
concrete drafter. Verification itself lives in the decoder (one batched
decode of `[last, d1..dk]`, each row sampled by the request's own sampler
chain).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.backend.tokens import common_prefix

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
    took. `probs`, where a drafter has them, are the drafter's probabilities
    of each proposed token (what speculative sampling needs); None otherwise.
    """

    tokens: list[int]
    strength: int = 0
    cost_ms: float = 0.0
    probs: list[float] | None = None


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


class Sampler(Protocol):
    def sample(self, row: int) -> int: ...
    def close(self) -> None: ...


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


def build_chain(
    draft_model: DraftModel | None = None, mtp: MtpHeads | None = None, *, seq: int = 0
) -> list[Drafter]:
    """The drafters in the order they are asked: the model's MTP heads when it has
    usable ones, n-gram lookup, then a draft model. `seq` is the slot's sequence
    (an MTP drafter drafts in it)."""
    from engine.speculative.mtp import MtpDrafter

    chain: list[Drafter] = [MtpDrafter(mtp, seq)] if mtp is not None else []
    chain.append(NgramDrafter())
    if draft_model is not None:
        chain.append(DraftModelDrafter(draft_model))
    return chain


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
    """Drafts with a small model that shares the target's vocabulary, greedily.

    It keeps its own KV cache in step with the accepted history: before each
    draft it trims what the target rejected and evaluates what it has not
    seen, then decodes k tokens one by one.
    """

    name = "draft"
    cheap = False

    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.history: list[int] = []
        self._in_kv: list[int] = []
        self._chain: Sampler = model.greedy_sampler()

    def prior(self, strength: int) -> float:
        return 0.7

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = list(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def _sync(self) -> None:
        keep = min(common_prefix(self._in_kv, self.history), len(self.history) - 1)
        if keep < len(self._in_kv) and not self.model.truncate(DRAFT_SEQ, keep):
            self.model.clear()
            keep = 0
        self._in_kv = self._in_kv[:keep]
        todo = self.history[keep:]
        self.model.decode(DRAFT_SEQ, todo, keep)
        self._in_kv.extend(todo)

    def propose(self, k: int) -> Draft:
        """k greedy tokens; `cost_ms` is the time they took in all."""
        if k <= 0 or not self.history:
            return Draft([])
        start = time.perf_counter()
        self._sync()
        out: list[int] = []
        room = self.model.n_ctx - len(self._in_kv) - 1
        for i in range(min(k, room)):
            token = self._chain.sample(-1)
            out.append(token)
            if self.model.is_eog(token) or i == k - 1:
                break
            self.model.decode(DRAFT_SEQ, (token,), len(self._in_kv))
            self._in_kv.append(token)
        return Draft(out, cost_ms=(time.perf_counter() - start) * 1000.0)

    def close(self) -> None:
        self._chain.close()
