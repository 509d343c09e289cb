"""Engine-control wire types: what to load (`LoadRequest`) and `EngineStatus` (docs/api.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from engine.wire.base import MAX_N_CTX, FlashAttn, KVType, WireModel

# llama-server's `-np auto`: four slots sharing one unified KV cache.
AUTO_PARALLEL = 4
# Requests allowed to wait for a slot. An agent that fans out tool calls or
# sub-tasks sends bursts of dozens at once; 64 waiting (besides the busy
# slots) queues such a burst instead of refusing most of it, and a waiting
# request costs only its prompt. Past that a client is better told at once
# (503) than left waiting minutes (docs/api.md).
DEFAULT_QUEUE_LIMIT = 64


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
    # Requests decoded at once, one KV sequence each (llama-server's -np; 4 is its "auto").
    n_parallel: int = Field(default=AUTO_PARALLEL, ge=1, le=64)
    # One KV cache of n_ctx cells shared by every slot (a request may use it
    # all); off: each slot gets n_ctx / n_parallel cells of its own.
    kv_unified: bool = True
    mtp: bool = True  # load the model's MTP heads, if it has usable ones (--no-mtp)
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
    # The draft model in use (its id), and the share of its drafted tokens accepted.
    draft_model: str | None = None
    draft_acceptance: float | None = None
    # The model's MTP heads (NextN blocks), and why the MTP drafter is off
    # although it has some (None: it is on, or there are none).
    mtp_heads: int = 0
    mtp_unavailable: str | None = None


class RuntimeInfo(BaseModel):
    """The engine runtime in use; `default` is the llama.cpp built into Peregrine."""

    name: str
    backend: str
    # The runtime asked for, when another one runs instead, and why (docs/api.md).
    requested: str | None = None
    fallback_reason: str | None = None


class QueueInfo(BaseModel):
    waiting: int
    limit: int


SlotStateName = Literal["idle", "prefill", "generating", "parked", "done"]


class SlotStatus(BaseModel):
    """One parallel slot: what it is doing, for how long, and how much of its prompt was cached."""

    id: int
    state: SlotStateName
    age_s: float = 0.0  # since its request was admitted (0 when idle)
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens reused from the cache (the cache hit)
    n_generated: int = 0
    n_ctx_used: int = 0  # KV cells the slot's sequence holds


class ToolFormatStatus(BaseModel):
    """The loaded model's tool-call syntax, and whether a forced call parsed back after load."""

    name: str
    # None until the self-test has run (it waits for idle time).
    self_test: bool | None = None
    detail: str | None = None


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
    slots: list[SlotStatus] = Field(default_factory=list)
    tool_format: ToolFormatStatus | None = None
