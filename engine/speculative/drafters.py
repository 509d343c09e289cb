"""Drafters: guess the next tokens for the decoder to verify in one batch.

Verification itself lives in the decoder (one batched decode of
`[last, d1..dk]`, each row sampled by the request's own sampler chain).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol


class DraftModel(Protocol):
    """What a draft model must offer (LlamaModel implements it)."""

    n_ctx: int

    def decode(self, tokens: Sequence[int], pos0: int, *, logits_all: bool = False) -> float: ...
    def truncate(self, n_keep: int) -> bool: ...
    def clear(self) -> None: ...
    def sample(self, sampler: Any, row: int) -> int: ...
    def is_eog(self, token: int) -> bool: ...
    def greedy_sampler(self) -> Any: ...


class NgramDrafter:
    """Drafts by matching the longest recent suffix against the whole context.

    The index maps each n-gram (n_min..n_max) to the position right after its
    most recent earlier occurrence; it is updated per appended token in
    O(n_max - n_min) dictionary operations, so its cost per token does not grow
    with the context.
    """

    name = "ngram"

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

    def __init__(self, model: DraftModel) -> None:
        self.model = model
        self.history: list[int] = []
        self._in_kv: list[int] = []
        self._chain = model.greedy_sampler()

    def reset(self, tokens: Sequence[int]) -> None:
        self.history = list(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        self.history.extend(tokens)

    def _sync(self) -> None:
        from engine.decoding.prefix_cache import common_prefix

        keep = min(common_prefix(self._in_kv, self.history), len(self.history) - 1)
        if keep < len(self._in_kv) and not self.model.truncate(keep):
            self.model.clear()
            keep = 0
        self._in_kv = self._in_kv[:keep]
        todo = self.history[keep:]
        self.model.decode(todo, keep)
        self._in_kv.extend(todo)

    def draft(self, k: int) -> tuple[list[int], float]:
        """k greedy tokens, and the milliseconds it took per token."""
        if k <= 0 or not self.history:
            return [], 0.0
        start = time.perf_counter()
        self._sync()
        out: list[int] = []
        room = self.model.n_ctx - len(self._in_kv) - 1
        for i in range(min(k, room)):
            token = self.model.sample(self._chain.handle, -1)
            out.append(token)
            if self.model.is_eog(token) or i == k - 1:
                break
            self.model.decode((token,), len(self._in_kv))
            self._in_kv.append(token)
        ms = (time.perf_counter() - start) * 1000.0
        return out, ms / max(len(out), 1)

    def close(self) -> None:
        self._chain.close()
