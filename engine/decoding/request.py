"""One generation request, its options, and its result (shared by slots, decoder, scheduler)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from engine.backend.llama import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]
SpecType = Literal["auto", "none", "ngram", "draft", "mtp"]


@dataclass(frozen=True)
class SpecParams:
    type: SpecType = "auto"
    n_max: int = 8
    n_min: int = 0
    p_min: float = 0.0


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    speculative: SpecParams = field(default_factory=SpecParams)
    cancel: threading.Event = field(default_factory=threading.Event)
    # A compiled llguidance grammar (engine/structured/schema.py) the answer must follow.
    grammar: str | None = None
    # None: no logprobs; 0..20: each token's logprob and that many alternatives.
    top_logprobs: int | None = None
    # Called with the logprobs of the tokens behind the text of the next on_text call.
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: int
    piece: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass
class Timings:
    """Per-request figures, with llama-server's names (docs/api.md)."""

    prompt_n: int = 0
    cache_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    draft_n: int = 0
    draft_n_accepted: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {
            "prompt_n": self.prompt_n,
            "cache_n": self.cache_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": _rate(self.prompt_n, self.prompt_ms),
            "predicted_n": self.predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_second": _rate(self.predicted_n, self.predicted_ms),
            "draft_n": self.draft_n,
            "draft_n_accepted": self.draft_n_accepted,
        }


def _rate(n: int, ms: float) -> float:
    return round(n * 1000.0 / ms, 3) if ms > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # when the request asked for them
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
