"""Switching the running engine's model through `/v1/engine/load`, without Qt.

The engine answers a load with 202 at once and shows its course in
`/v1/engine/status` (docs/api.md). `follow_load` reads one status as a typed
step, so the GUI only polls and draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.services.settings import EngineSettings, LoadSettings
from engine.wire.control import EngineStatus, LoadRequest

# What /v1/engine/load uses for a field left unset (docs/api.md).
ENGINE_DEFAULT_CTX = 4096


# LoadSettings fields that go to the LoadRequest as they are, when set.
LOAD_FIELDS = (
    "n_gpu_layers",
    "type_k",
    "type_v",
    "flash_attn",
    "runtime",
    "tensor_split",
    "n_cpu_moe",
    "expert_offload",
)


def load_settings_of(request: LoadRequest) -> LoadSettings:
    """The settings to remember for a model loaded with `request` (the wizard's Apply)."""
    return LoadSettings(
        n_ctx=request.n_ctx,
        threads=request.threads or None,
        draft_model=request.draft_model,
        **{name: getattr(request, name) for name in LOAD_FIELDS},
    )


def load_request(model: Path, load: LoadSettings, engine: EngineSettings) -> LoadRequest:
    """The body of `/v1/engine/load`: the model's own settings over the engine defaults."""
    fields: dict[str, object] = {
        "model": str(model),
        "draft_model": load.draft_model,
        "n_ctx": load.n_ctx or engine.n_ctx or ENGINE_DEFAULT_CTX,
        "threads": load.threads or engine.threads or 0,
    }
    for name in LOAD_FIELDS:
        value = getattr(load, name)
        if value is not None:
            fields[name] = value
    return LoadRequest.model_validate(fields)


@dataclass(frozen=True)
class LoadUnderway:
    """The engine is still loading; progress is 0..1."""

    progress: float


@dataclass(frozen=True)
class LoadDone:
    """The requested model serves now."""

    model: str


@dataclass(frozen=True)
class LoadFailed:
    """The load failed; `serving` is the model that still serves (None: none does)."""

    message: str
    serving: str | None


LoadStep = LoadUnderway | LoadDone | LoadFailed


def follow_load(status: EngineStatus, requested: str) -> LoadStep:
    """What one status says about the load of `requested` (a path, as sent)."""
    if status.state == "loading":
        return LoadUnderway(max(0.0, min(1.0, status.load_progress)))
    serving = status.model.path if status.model is not None and status.state != "error" else None
    if status.error:
        return LoadFailed(status.error, serving)
    if serving == requested:
        return LoadDone(requested)
    return LoadFailed(
        "the engine did not load it (another load may have replaced it)",
        serving,
    )
