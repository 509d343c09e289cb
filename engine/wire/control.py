"""Engine-control wire types: what to load (`LoadRequest`) and `EngineStatus` (docs/api.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from engine.wire.base import MAX_N_CTX, FlashAttn, KVType, WireModel


class LoadRequest(WireModel):
    """What to load and how: the planner's output and `/v1/engine/load`'s body."""

    model: str
    draft_model: str | None = None
    runtime: str | None = None
    n_ctx: int = Field(default=4096, ge=16, le=MAX_N_CTX)
    n_gpu_layers: int = Field(default=-1, ge=-1)
    tensor_split: list[float] | None = None
    expert_offload: bool = False  # every layer's MoE experts in system RAM (--cpu-moe)
    # MoE experts of the first n layers in system RAM (llama-server's --n-cpu-moe);
    # expert_offload is the same as n_cpu_moe >= the model's layer count.
    n_cpu_moe: int = Field(default=0, ge=0, le=1 << 16)
    type_k: KVType = "f16"
    type_v: KVType = "f16"
    flash_attn: FlashAttn = "auto"
    n_batch: int = Field(default=512, ge=1, le=1 << 16)
    n_ubatch: int = Field(default=512, ge=1, le=1 << 16)
    threads: int = Field(default=0, ge=0, le=1024)  # 0: the engine picks
    # Matrix products that round the same for any batch size (docs/architecture.md,
    # "Exactness"): no repacked weights and no tiled K-quant product.
    batch_invariant: bool = False


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
