"""The grammar state of one request: which tokens may come next (llguidance's matcher).

A `GrammarTokenizer` is built once per model from its vocabulary (about 0.5 s
for 49k tokens); a `Constraint` per request follows the tokens generated and
masks logits when the sampler's own choice breaks the grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab
from numpy.typing import NDArray

from engine.errors import PeregrineError


class GrammarError(PeregrineError):
    """The grammar could not go on (a matcher error: a bug or a resource limit)."""


def grammar_tokenizer(vocab: Any, end_tokens: Sequence[int]) -> LLTokenizer:
    """llguidance's view of a llama.cpp vocabulary; `end_tokens` end a finished answer."""
    return lltokenizer_from_vocab(vocab, eos_token=list(end_tokens))


class Constraint:
    """One request's grammar: checks single tokens, masks logits, follows accepted tokens."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, n_vocab: int) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        self._check()
        self.n_vocab = n_vocab
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        # Counts for the benchmark and the docs: how often the cheap check sufficed.
        self.checks = 0
        self.masks = 0

    def _check(self) -> None:
        if self._matcher.is_error():
            error = " ".join(self._matcher.get_error().split())[:300]
            raise GrammarError(f"the grammar could not go on: {error}")

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (one token checked, not the vocabulary)."""
        self.checks += 1
        return bool(self._matcher.validate_tokens([token]) == 1)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar allows in a row from here (draft tokens)."""
        return int(self._matcher.validate_tokens(list(tokens))) if tokens else 0

    def mask(self, logits: NDArray[np.float32]) -> None:
        """Sets every token the grammar forbids next to -inf, in place."""
        self.masks += 1
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        self._check()
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self.n_vocab]
        if not allowed.any():
            raise GrammarError("the grammar allows no token here")
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        """Moves the grammar past `token` (one it allowed)."""
        if not self._matcher.consume_token(token):
            self._check()
            raise GrammarError(f"the grammar refused token {token}")

    @property
    def finished(self) -> bool:
        """The answer is complete: the grammar allows nothing more but the end."""
        return bool(self._matcher.is_stopped())
