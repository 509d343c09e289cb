"""Wire types shared by every part: the base model and the KV-cache type tables.

Wire types are declared once, in this package, by concept: `engine.wire.openai`
(the OpenAI-compatible requests) and `engine.wire.control` (loading, status).
Request bodies are validated strictly (a wrong type is a 400), and unknown
fields are ignored, as OpenAI clients expect (docs/api.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

KVType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
FlashAttn = Literal["on", "off", "auto"]

# ggml type ids of the KV cache types (ggml.h `enum ggml_type`).
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
