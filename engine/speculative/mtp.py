"""The MTP drafter: drafts with the model's own multi-token-prediction heads.

The heads live beside the target in an MTP context (engine/backend/mtp.py)
that every target decode feeds with its tokens and hidden states, so the
drafter only has to say where the slot stands: the last sampled token (not
yet in the KV cache) and its position. One MTP sequence per slot: the one of
the slot's own sequence id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from engine.speculative.drafters import Draft

# The chance that an MTP head's first draft is accepted, assumed until measured
# (published figures: about 75% on Qwen3.6 and GLM-4.5).
MTP_PRIOR = 0.7


class MtpHeads(Protocol):
    """What the drafter needs of the MTP context (MtpContext implements it)."""

    def draft(self, seq: int, token: int, n_past: int, k: int) -> tuple[list[int], list[float]]: ...


class MtpDrafter:
    """Drafts k tokens greedily with the MTP heads, chaining each on the last.

    Costly (each draft token is one decode of a NextN block), so the decoder
    asks only for the k the controller chose from measured acceptance and cost.
    Greedy picks come from no distribution the target could weigh them
    against, so the drafts carry none and are verified by sample and compare
    (lossless at any temperature).
    """

    name = "mtp"
    cheap = False

    def __init__(self, heads: MtpHeads, seq: int = 0) -> None:
        self.heads = heads
        self.seq = seq
        # Every token of the request so far; the last is the pending one.
        self.n_tokens = 0
        self.last = -1

    def prior(self, strength: int) -> float:
        return MTP_PRIOR

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
        start = time.perf_counter()
        tokens, _confidence = self.heads.draft(self.seq, self.last, self.n_tokens - 1, k)
        return Draft(tokens, cost_ms=(time.perf_counter() - start) * 1000.0)

    def close(self) -> None:
        pass  # the MTP context belongs to the model
