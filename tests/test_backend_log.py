"""llama.cpp's log callback outlives every capture (a freed one crashed the next load)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import gc, sys
import llama_cpp
from engine.backend.llama import LlamaLogCapture

first = LlamaLogCapture()
del first
gc.collect()
# Quantizing logs through whatever callback llama.cpp was given last.
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = 2  # Q4_0
params.allow_requantize = True
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
second = LlamaLogCapture()
rc2 = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
print(rc, rc2, any("quantiz" in line for line in second.lines))
"""


def test_a_dropped_capture_leaves_a_live_log_callback(default_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4_0.gguf"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(default_model), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "0", "True"]
