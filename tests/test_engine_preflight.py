"""A model that makes llama.cpp abort must not take the model in use with it.

The header gate (engine/gguf/header.py) refuses every abort we know of; the
trial load in a child process is the net for the ones we don't. This test
turns the gate off, so the trial load is the only guard, and runs the engine
in a child process of its own: if the guard failed, llama.cpp's abort would
end that child, not the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.planning.probe import DryRunCrashed, measure
from engine.wire.control import LoadRequest
from tests.gguf_fixtures import tiny_model

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
from engine.default_model import default_model_path
from engine.serving.scheduler import Engine
from engine.serving.serve_cli import _preflight_load
from engine.wire.control import LoadRequest

engine = Engine(preflight=_preflight_load)  # no header gate
engine.load(LoadRequest(model=str(default_model_path()), n_ctx=512, threads=1)).wait(300)
engine.load(LoadRequest(model=sys.argv[1], n_ctx=256, threads=1)).wait(300)
print(json.dumps({"state": engine.state, "error": engine.error, "model": engine.model_id}))
"""


def test_a_model_that_aborts_llama_cpp_is_refused_by_a_trial_load(tmp_path: Path) -> None:
    bad = tiny_model(tmp_path / "zero-layers.gguf", llama__block_count=0)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"the engine died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "ready"
    assert result["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert "crashed" in result["error"] and "GGML_ASSERT" in result["error"]


def test_the_trial_load_names_the_assert(tmp_path: Path) -> None:
    bad = tiny_model(tmp_path / "zero-layers.gguf", llama__block_count=0)
    try:
        measure(LoadRequest(model=str(bad), n_ctx=256))
    except DryRunCrashed as exc:
        assert "SIGABRT" in str(exc) and "n_layer" in str(exc)
    else:
        raise AssertionError("llama.cpp accepted a model with 0 layers")
