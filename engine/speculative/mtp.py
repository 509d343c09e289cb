"""The MTP drafter: drafts with the model's own multi-token-prediction heads.

The heads live beside the target in an MTP context (engine/backend/mtp.py)
that every target decode feeds with its tokens and hidden states, so the
drafter only has to say where the slot stands: the last sampled token (not
yet in the KV cache) and its position. One MTP sequence per slot: the one of
the slot's own sequence id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from engine.backend.llama import SamplingParams
from engine.speculative.acceptance import TokenDist
from engine.speculative.drafters import Draft, DraftSampling, Sampler

# The chance that an MTP head's first draft is accepted, assumed until measured
# (published figures: about 75% on Qwen3.6 and GLM-4.5).
MTP_PRIOR = 0.7

# The drafter's own random stream, apart from the draft model's (1) and the verifier's.
MTP_STREAM = 2


class MtpHeads(Protocol):
    """What the drafter needs of the MTP context (MtpContext implements it)."""

    def sampler(self, params: SamplingParams) -> Sampler: ...
    def draft(
        self,
        seq: int,
        token: int,
        n_past: int,
        k: int,
        pick: Callable[[NDArray[np.float32]], int] | None = None,
    ) -> tuple[list[int], list[float]]: ...


class MtpDrafter:
    """Drafts k tokens with the MTP heads, chaining each on the last.

    Under a sampling request each draft token is drawn from the head's
    logits after the request's chain (`DraftSampling`, as the draft model
    draws) and the drafts carry those distributions, so the target verifies
    them by speculative sampling: the heads give logits, and drafts drawn
    like the request are kept far more often than greedy ones compared with
    the target's sample. Greedy requests get the argmax (q = 1 on it),
    verified by sample and compare, so greedy output is byte-identical to
    plain decoding.

    Costly (each draft token is one decode of a NextN block), so the decoder
    asks only for the k the controller chose from measured acceptance and cost.
    """

    name = "mtp"
    cheap = False

    def __init__(
        self,
        heads: MtpHeads,
        seq: int = 0,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.heads = heads
        self.seq = seq
        self.clock = clock
        # Every token of the request so far; the last is the pending one.
        self.n_tokens = 0
        self.last = -1
        self._sampling = DraftSampling(heads.sampler, stream=MTP_STREAM)

    def prior(self, strength: int) -> float:
        return MTP_PRIOR

    def sample_like(self, params: SamplingParams) -> None:
        self._sampling.sample_like(params)

    def reset(self, tokens: Sequence[int]) -> None:
        self.n_tokens = len(tokens)
        self.last = tokens[-1] if tokens else -1

    def extend(self, tokens: Sequence[int]) -> None:
        if tokens:
            self.n_tokens += len(tokens)
            self.last = tokens[-1]

    def propose(self, k: int) -> Draft:
        """Up to k drafts after the pending token; `cost_ms` is the time they took."""
        if k <= 0 or self.n_tokens < 2:
            return Draft([])
        start = self.clock()
        if not self._sampling.active:
            tokens, _ = self.heads.draft(self.seq, self.last, self.n_tokens - 1, k)
            return Draft.drawn(tokens, None, (self.clock() - start) * 1000.0)
        dists: list[TokenDist] = []

        def pick(logits: NDArray[np.float32]) -> int:
            token, dist = self._sampling.draw(logits)
            dists.append(dist)
            return token

        tokens, _ = self.heads.draft(self.seq, self.last, self.n_tokens - 1, k, pick)
        return Draft.drawn(tokens, dists[: len(tokens)], (self.clock() - start) * 1000.0)

    def close(self) -> None:
        # The MTP context belongs to the model; the request's chain is the drafter's.
        self._sampling.close()
