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
    n_ctx: int = Field(default=4096, ge=16, le=1 << 22)
    n_gpu_layers: int = Field(default=-1, ge=-1)
    tensor_split: list[float] | None = None
    expert_offload: bool = False
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: FlashAttn = "auto"
    n_batch: int = Field(default=512, ge=1, le=1 << 16)
    n_ubatch: int = Field(default=512, ge=1, le=1 << 16)
    threads: int = Field(default=0, ge=0, le=1024)  # 0: the engine picks
