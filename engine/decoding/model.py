"""What the decoding loop needs from a loaded model, and from its samplers.

`LlamaModel` (engine/backend/llama.py) implements both protocols; tests drive
the loop with a scripted fake model instead (tests/fake_model.py). Every KV
and state operation names a sequence id: one per slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from engine.backend.llama import BatchPart, SamplingParams


class Sampler(Protocol):
    """One request's sampler chain, bound to the model that made it."""

    def sample(self, row: int) -> int:
        """Samples a token from output row `row` of the last decode (-1: the last
        row) and accepts it into the chain's state (penalties, RNG)."""
        ...

    def pick(self, logits: NDArray[np.float32]) -> int:
        """Runs the chain over `logits` and returns its choice, without accepting it."""
        ...

    def distribution(
        self, logits: NDArray[np.float32]
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The tokens and weights the chain's final draw picks from, over `logits`
        (speculative sampling's p); nothing is drawn or accepted."""
        ...

    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


class Model(Protocol):
    n_ctx: int
    n_ctx_seq: int  # cells one sequence may use (n_ctx in a unified cache)
    n_seq_max: int  # sequences the context holds: one per slot
    n_batch: int
    n_vocab: int
    has_recurrent_state: bool

    def decode(
        self, seq: int, tokens: Sequence[int], pos0: int, *, logits_all: bool = False
    ) -> float:
        """Evaluates tokens of sequence `seq` from position pos0; the wall time in ms."""
        ...

    def decode_batch(self, parts: Sequence[BatchPart]) -> float:
        """Evaluates every part in one batch (rows in order); the wall time in ms.

        Raises ContextFull, having changed nothing, when the cache has no room.
        """
        ...

    def truncate(self, seq: int, n_keep: int) -> bool:
        """Drops the cells of `seq` from position n_keep on; False if refused."""
        ...

    def clear(self) -> None: ...
    def state_size(self, seq: int) -> int: ...
    def save_state(self, seq: int) -> bytearray: ...
    def restore_state(self, seq: int, data: bytes | bytearray) -> bool: ...
    def sampler(self, params: SamplingParams) -> Sampler: ...
    def piece(self, token: int) -> bytes: ...
    def is_eog(self, token: int) -> bool: ...

    # Structured output and logprobs only (engine/decoding/sampling.py).
    @property
    def eos(self) -> int: ...
    def logits(self, row: int) -> NDArray[np.float32]:
        """Output row `row`'s raw logits, writable in place (-1: the last row)."""
        ...

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer for this vocabulary (engine/structured/constraint.py)."""
        ...
