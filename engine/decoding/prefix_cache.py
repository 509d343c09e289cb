"""Saved KV states of recent conversations, found again by longest token prefix.

When a request would throw away most of what is in the context (the user
switched chats), the decoder first saves the context's sequence state here
(about 1 ms for 400 tokens); when a request later shares a longer prefix with
a saved state than with the live context, that state is restored instead of
re-reading the prompt. Entries are evicted least-recently-used within a byte
limit the memory planner can count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.backend.tokens import common_prefix


@dataclass(frozen=True)
class SavedState:
    tokens: tuple[int, ...]
    data: bytes | bytearray

    @property
    def size(self) -> int:
        return len(self.data) + 4 * len(self.tokens)


class PrefixStateCache:
    """LRU of saved sequence states keyed by the tokens they hold."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self.hits = 0

    @property
    def size_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def best_match(self, prompt: Sequence[int]) -> tuple[SavedState | None, int]:
        best: SavedState | None = None
        best_len = 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def touch(self, entry: SavedState) -> None:
        # The entry may be gone already: stashing the live context just before
        # a restore can evict the very state being restored.
        if entry.tokens in self._entries:
            self._entries.move_to_end(entry.tokens)
        self.hits += 1

    def can_hold(self, n_bytes: int) -> bool:
        """Whether a state of this size could be kept at all (saving it is a full copy)."""
        return 0 < n_bytes <= self.limit_bytes

    def put(self, tokens: Sequence[int], data: bytes | bytearray) -> None:
        key = tuple(tokens)
        state = SavedState(key, data)
        if state.size > self.limit_bytes:
            return
        # A state that extends an older one of the same conversation replaces it.
        for old in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            del self._entries[old]
        self._entries[key] = state
        total = self.size_bytes
        while total > self.limit_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            total -= evicted.size

    def clear(self) -> None:
        self._entries.clear()
