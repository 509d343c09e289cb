"""Wire types shared by the engine, the planner and the app (CONTRACTS.md).

Declared once here. Request bodies are validated strictly (a wrong type is a
400), and unknown fields are ignored, as OpenAI clients expect.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

KVType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
FlashAttn = Literal["on", "off", "auto"]

# ggml type ids of the KV cache types (ENGINE_NOTES.md).
KV_TYPE_IDS: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "iq4_nl": 20,
    "bf16": 30,
}

# The longest context a LoadRequest may ask for (4 Mi tokens); headers may claim more.
MAX_N_CTX = 1 << 22

# Bytes per element of each KV type (block size / elements per block).
KV_BYTES_PER_ELEMENT: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


class WireModel(BaseModel):
    """Base for wire types: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class LoadRequest(WireModel):
    """What to load and how: the planner's output and `/v1/engine/load`'s body."""

    model: str
    draft_model: str | None = None
    runtime: str | None = None
    n_ctx: int = Field(default=4096, ge=16, le=MAX_N_CTX)
    n_gpu_layers: int = Field(default=-1, ge=-1)
    tensor_split: list[float] | None = None
    expert_offload: bool = False
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: FlashAttn = "auto"
    n_batch: int = Field(default=512, ge=1, le=1 << 16)
    n_ubatch: int = Field(default=512, ge=1, le=1 << 16)
    threads: int = Field(default=0, ge=0, le=1024)  # 0: the engine picks


# --- OpenAI-compatible requests -----------------------------------------------------


class SpeculativeOptions(WireModel):
    """Per-request speculation (`"speculative": {...}` or llama-server's flat keys)."""

    type: Literal["auto", "none", "ngram", "draft", "mtp"] = "auto"
    n_max: int = Field(default=8, ge=0, le=64)
    n_min: int = Field(default=0, ge=0, le=64)
    p_min: float = Field(default=0.0, ge=0.0, le=1.0)


class ContentPart(WireModel):
    type: str
    text: str | None = None


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class StreamOptions(WireModel):
    include_usage: bool = False


class SamplingFields(WireModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    speculative: SpeculativeOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False


# --- engine control ------------------------------------------------------------------

EngineState = Literal["idle", "loading", "ready", "generating", "error"]


class ModelRef(BaseModel):
    id: str
    path: str


class MemoryFigures(BaseModel):
    weights: int = 0
    kv: int = 0
    compute: int = 0
    total: int = 0


class SpeculativeStatus(BaseModel):
    drafter: str | None = None
    acceptance: float | None = None
    n_draft: int = 0


class RuntimeInfo(BaseModel):
    name: str
    backend: str


class QueueInfo(BaseModel):
    waiting: int
    limit: int


class EngineStatus(BaseModel):
    state: EngineState
    load_progress: float
    error: str | None
    model: ModelRef | None
    settings: LoadRequest | None
    memory: MemoryFigures
    speculative: SpeculativeStatus
    runtime: RuntimeInfo
    queue: QueueInfo
