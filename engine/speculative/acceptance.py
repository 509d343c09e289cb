"""Verifying a draft: which drafted tokens the target keeps, and the token after them.

Row i of a verify batch `[pending, d1..dk]` holds the target's logits for the
token after d1..di. Two rules decide, and both are lossless: the emitted
tokens follow the target's own distribution exactly (docs/architecture.md).

- **Sample and compare** (`sample_and_compare`): row i is sampled by the
  request's chain, and d(i+1) is kept while it equals that sample. This is
  right for a drafter without a distribution (n-gram lookup, a greedy draft
  model), and it consumes the chain's RNG exactly as plain decoding does, so
  seeded answers stay byte-identical.
- **Speculative sampling** (`speculative_sampling`), for a drafter that drew
  its tokens from a distribution q it reports: d is kept with probability
  min(1, p(d)/q(d)); at the first rejection the token is drawn from the
  normalised max(0, p - q) instead. p is the target's distribution after the
  request's whole sampler chain (bias, penalties, top-k/top-p/min-p,
  temperature, grammar). A greedy drafter has q = 1 on its token, and the rule
  then accepts with probability p(d), as sample-and-compare does; a drafter
  that samples from a q close to p has most of its drafts accepted.

Either way stateful samplers (penalties, the grammar) are moved on by the
emitted tokens only: a rejected draft token is never accepted into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class TokenDist:
    """A distribution over tokens, sparse: `tokens` ascending, `probs` summing to 1."""

    tokens: NDArray[np.int64]
    probs: NDArray[np.float64]

    @staticmethod
    def of(tokens: NDArray[np.integer], weights: NDArray[np.floating]) -> TokenDist:
        """Normalises non-negative `weights` over `tokens` (any order, no repeats)."""
        w = np.asarray(weights, dtype=np.float64)
        keep = w > 0.0
        ids = np.asarray(tokens, dtype=np.int64)[keep]
        w = w[keep]
        total = float(w.sum())
        if not ids.size or not np.isfinite(total) or total <= 0.0:
            raise ValueError("a token distribution needs a positive weight")
        order = np.argsort(ids, kind="stable")
        return TokenDist(ids[order], w[order] / total)

    @staticmethod
    def one(token: int) -> TokenDist:
        """Certainty on one token (what a greedy pick draws from)."""
        return TokenDist(np.array([token], dtype=np.int64), np.ones(1))

    def prob(self, token: int) -> float:
        i = int(np.searchsorted(self.tokens, token))
        return float(self.probs[i]) if i < self.tokens.size and self.tokens[i] == token else 0.0

    def probs_of(self, tokens: NDArray[np.int64]) -> NDArray[np.float64]:
        """The probability of each of `tokens` (0 outside the support)."""
        i = np.searchsorted(self.tokens, tokens)
        i = np.minimum(i, self.tokens.size - 1)
        hit = self.tokens[i] == tokens
        return np.where(hit, self.probs[i], 0.0)

    def draw(self, u: float) -> int:
        """The token at cumulative probability u in [0, 1) (inverse CDF)."""
        cdf = np.cumsum(self.probs)
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        return int(self.tokens[min(i, self.tokens.size - 1)])


def acceptance_probability(p: TokenDist, q: TokenDist, token: int) -> float:
    """min(1, p(token)/q(token)): the chance the drafted `token` is kept."""
    pt, qt = p.prob(token), q.prob(token)
    if qt <= 0.0:
        # Never drawn from q: keep it only if the target could emit it at all.
        return 1.0 if pt > 0.0 else 0.0
    return min(1.0, pt / qt)


def residual(p: TokenDist, q: TokenDist) -> TokenDist:
    """The normalised max(0, p - q): what a rejection resamples from.

    When p <= q everywhere (p == q up to rounding) a rejection has
    probability 0; p itself is returned so the draw is still well defined.
    """
    weights = np.maximum(p.probs - q.probs_of(p.tokens), 0.0)
    if not (weights > 0.0).any():
        return p
    return TokenDist.of(p.tokens, weights)


class Rows(Protocol):
    """The target's output rows of one verify batch, seen through the request's sampler."""

    def sample(self, row: int) -> int:
        """Samples row `row` with the request's chain and accepts the token into it."""
        ...

    def distribution(self, row: int) -> TokenDist:
        """p for row `row`: the distribution after the whole chain, nothing accepted."""
        ...

    def accept(self, token: int, row: int) -> None:
        """Moves the chain (penalties, grammar, logprobs) past `token`, chosen from `row`."""
        ...


class Uniform(Protocol):
    def random(self) -> float: ...


@dataclass(frozen=True)
class Verdict:
    """How many draft tokens were kept, and the token that follows them (not in the cache)."""

    accepted: int
    next_token: int


def sample_and_compare(rows: Rows, draft: Sequence[int]) -> Verdict:
    """Keeps draft tokens while the chain's own sample equals them."""
    accepted = 0
    nxt = rows.sample(0)
    while accepted < len(draft) and nxt == draft[accepted]:
        accepted += 1
        nxt = rows.sample(accepted)
    return Verdict(accepted, nxt)


def speculative_sampling(
    rows: Rows, draft: Sequence[int], dists: Sequence[TokenDist], rng: Uniform
) -> Verdict:
    """Keeps d with probability min(1, p(d)/q(d)); resamples max(0, p - q) at the first miss.

    `dists[i]` is the distribution draft token i was drawn from. After a
    fully accepted draft the next token is drawn from the last row's p.
    """
    if len(dists) < len(draft):
        raise ValueError("speculative sampling needs the distribution of every draft token")
    for i, token in enumerate(draft):
        p = rows.distribution(i)
        if rng.random() < acceptance_probability(p, dists[i], token):
            rows.accept(token, i)
            continue
        nxt = residual(p, dists[i]).draw(rng.random())
        rows.accept(nxt, i)
        return Verdict(i, nxt)
    last = len(draft)
    nxt = rows.distribution(last).draw(rng.random())
    rows.accept(nxt, last)
    return Verdict(last, nxt)


def verify(
    rows: Rows, draft: Sequence[int], dists: Sequence[TokenDist] | None, rng: Uniform
) -> Verdict:
    """The rule a draft calls for: speculative sampling when it came with distributions."""
    if dists is None:
        return sample_and_compare(rows, draft)
    return speculative_sampling(rows, draft, dists, rng)
