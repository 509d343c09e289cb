"""How each token of one request is picked: its sampler chain, its grammar, its logprobs.

The one place where a request's sampling comes together (docs/api.md):

- **Chain.** logit bias, penalties, top-k/top-p/min-p, temperature, then the
  draw, in llama.cpp's C sampler chain (`SamplerChain`).
- **Grammar** (structured output), as llama.cpp's `common/sampling.cpp` does
  it: the chain picks over the raw logits, the grammar checks that one token,
  and only when it is refused are the logits masked (forbidden tokens to
  -inf) and the chain run again. The mask comes before top-k/top-p, so they
  never cut the allowed tokens away. A greedy pick is exact; a sampled one is
  rejection sampling, which keeps the masked distribution.
- **Logprobs**: a log-softmax of the raw logits, before bias, penalties,
  temperature and grammar (llama-server's default), with the top alternatives.
- **Distributions** for speculative sampling (engine/speculative/acceptance.py):
  `distribution(row)` is the chain's distribution after everything, the
  grammar's full mask included; `accept` then moves chain and grammar past
  the token the rule chose.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from engine.decoding.model import Model, Sampler
from engine.decoding.request import GenerationRequest, TokenLogprob, TopLogprob
from engine.speculative.acceptance import TokenDist
from engine.structured.constraint import Constraint


class TokenSampler:
    """Picks tokens for one request from output rows, in order; closed when the request ends."""

    def __init__(
        self,
        model: Model,
        chain: Sampler,
        *,
        constraint: Constraint | None = None,
        top_logprobs: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.chain = chain  # the request's Sampler (engine/decoding/model.py)
        self.constraint = constraint
        # None: no logprobs; 0..20: the sampled token's, plus that many alternatives.
        self.top_logprobs = top_logprobs
        self._logprobs: deque[TokenLogprob] = deque()
        # Speculative sampling's draws (accept or not, resample), seeded with the
        # request (any integer: numpy takes non-negative seeds only).
        self.rng = np.random.default_rng(None if seed is None else seed % (1 << 64))

    def sample(self, row: int) -> int:
        """Samples the next token from output row `row` and accepts it into chain and grammar."""
        stats: tuple[float, tuple[TopLogprob, ...]] | None = None
        logits: NDArray[np.float32] | None = None
        if self.top_logprobs is not None or self.constraint is not None:
            logits = self.model.logits(row)
        if self.top_logprobs is not None:
            assert logits is not None
            stats = self._log_softmax(logits)
            # The grammar may set forbidden logits to -inf below: keep the sampled one raw.
            raw = logits.copy() if self.constraint is not None else logits
        if self.constraint is None:
            token = self.chain.sample(row)
        elif self.constraint.finished:
            # The answer is complete: only its end may follow.
            token = self.model.eos
        else:
            assert logits is not None
            token = self.chain.pick(logits)
            if not self.constraint.allows(token):
                self.constraint.mask(logits)
                token = self.chain.pick(logits)
            self.chain.accept(token)
            self.constraint.accept(token)
        if stats is not None:
            lse, top = stats
            piece = self.model.piece(token)
            self._logprobs.append(TokenLogprob(token, piece, float(raw[token]) - lse, top))
        return token

    def distribution(self, row: int) -> TokenDist:
        """Row `row`'s distribution after the whole chain and the grammar; nothing accepted."""
        if self.constraint is not None and self.constraint.finished:
            return TokenDist.one(self.model.eos)
        logits = self.model.logits(row).copy()  # the row stays raw for logprobs
        if self.constraint is not None:
            self.constraint.mask(logits)
        tokens, weights = self.chain.distribution(logits)
        return TokenDist.of(tokens, weights)

    def accept(self, token: int, row: int) -> None:
        """Moves chain and grammar past `token`, chosen from row `row` by the caller."""
        if self.top_logprobs is not None:
            logits = self.model.logits(row)
            lse, top = self._log_softmax(logits)
            piece = self.model.piece(token)
            self._logprobs.append(TokenLogprob(token, piece, float(logits[token]) - lse, top))
        if self.constraint is not None and self.constraint.finished:
            return  # only the end may follow; the chain has nothing more to learn
        self.chain.accept(token)
        if self.constraint is not None:
            self.constraint.accept(token)

    def _log_softmax(self, logits: NDArray[np.float32]) -> tuple[float, tuple[TopLogprob, ...]]:
        peak = float(np.max(logits))
        lse = peak + float(np.log(np.sum(np.exp(logits - peak, dtype=np.float64))))
        n = self.top_logprobs or 0
        if n <= 0:
            return lse, ()
        best = np.argpartition(-logits, n - 1)[:n]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = tuple(
            TopLogprob(int(t), self.model.piece(int(t)), float(logits[t]) - lse) for t in best
        )
        return lse, top

    def take_logprob(self) -> TokenLogprob | None:
        """The logprob record of the oldest sampled token not yet taken (tokens come out in order)."""
        return self._logprobs.popleft() if self._logprobs else None

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing may follow."""
        return self.constraint is not None and self.constraint.finished

    def valid_draft(self, draft: Sequence[int]) -> list[int]:
        """The longest prefix of a draft the grammar allows (all of it without a grammar)."""
        if self.constraint is None:
            return list(draft)
        return list(draft[: self.constraint.valid_prefix(draft)])

    def close(self) -> None:
        self.chain.close()


def sampler_for(model: Model, req: GenerationRequest) -> TokenSampler:
    """The sampler a request asks for: its chain, its grammar, its logprobs."""
    constraint = (
        Constraint(model.grammar_tokenizer(), req.grammar, model.n_vocab)
        if req.grammar is not None
        else None
    )
    return TokenSampler(
        model,
        model.sampler(req.sampling),
        constraint=constraint,
        top_logprobs=req.top_logprobs,
        seed=req.sampling.seed,
    )
