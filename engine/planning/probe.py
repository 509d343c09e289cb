"""Dry-run memory measurement: llama.cpp's own buffer sizes, with nothing allocated.

The parent (`measure`) starts `python -m engine.planning.probe --json --load '<LoadRequest>'`
in a child process. The child loads the model with `no_alloc=True` and
`load_mode=0` (NONE), creates the context, and reports the buffer sizes that
llama.cpp logs. It runs in a child because a llama.cpp assert aborts the whole
process, and a parent-side timeout turns a hang into an error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.child import NO_WINDOW, crash_reason, module_argv
from engine.errors import PeregrineError
from engine.paths import Paths
from engine.wire.base import KV_TYPE_IDS
from engine.wire.control import LoadRequest

MIB = 1024 * 1024
DEFAULT_TIMEOUT_S = 120.0

_FLASH_ATTN_TYPE = {"auto": -1, "off": 0, "on": 1}

# llama.cpp log lines (llama-model.cpp, llama-kv-cache.cpp, llama-context.cpp). Under
# no_alloc the model and KV *buffer* lines say 0.00 MiB, so weights come from
# llama_model_size() and KV from the cache's own `size =` summary line.
_RE_KV_SIZE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")
_RE_RS_SIZE = re.compile(r"llama_memory_recurrent: size =\s+([\d.]+) MiB")
_RE_COMPUTE = re.compile(r"(\S+) compute buffer size =\s+([\d.]+) MiB")
_RE_OUTPUT = re.compile(r"(\S+)\s+output buffer size =\s+([\d.]+) MiB")
_RE_LAYER = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")
_RE_N_CTX = re.compile(r"llama_context: n_ctx\s+=\s+(\d+)")
_RE_OVERRIDE = re.compile(r"^tensor (\S+) .* buffer type overridden to (\S+)")

# The MoE expert tensors that `expert_offload` keeps in system RAM (llama-server's --cpu-moe);
# common/common.h LLM_FFN_EXPS_REGEX ("chexps": chunked experts).
EXPERT_TENSOR_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


@dataclass
class MeasuredMemory:
    """What a dry run measured, in bytes; per-device maps are keyed "CPU", "CUDA0", ..."""

    weights_total: int = 0
    kv_total: int = 0
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    layer_devices: list[str] = field(default_factory=list)  # layers 0..n-1, then the output head
    overridden: int = 0  # tensors moved by tensor_buft_overrides (expert offload)
    n_ctx: int = 0
    gpu_devices: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.weights_total
            + self.kv_total
            + sum(self.compute.values())
            + sum(self.output.values())
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasuredMemory:
        return cls(
            weights_total=int(data["weights_total"]),
            kv_total=int(data["kv_total"]),
            compute={str(k): int(v) for k, v in data["compute"].items()},
            output={str(k): int(v) for k, v in data["output"].items()},
            layer_devices=[str(d) for d in data.get("layer_devices", [])],
            overridden=int(data.get("overridden", 0)),
            n_ctx=int(data["n_ctx"]),
            gpu_devices=[str(d) for d in data.get("gpu_devices", [])],
        )


def device_of_buffer(buffer_name: str) -> str:
    """Maps a ggml buffer name to the device that holds it; host buffers are "CPU"."""
    if buffer_name.startswith("CPU") or buffer_name.endswith("_Host"):
        return "CPU"
    return buffer_name


def parse_log(text: str) -> MeasuredMemory:
    """Reads the sizes out of llama.cpp's log of a (dry-run) load."""
    found = MeasuredMemory()
    layers: dict[int, str] = {}
    for line in text.splitlines():
        if m := _RE_KV_SIZE.search(line) or _RE_RS_SIZE.search(line):
            found.kv_total += round(float(m.group(1)) * MIB)
        elif m := _RE_COMPUTE.search(line):
            dev = device_of_buffer(m.group(1))
            found.compute[dev] = found.compute.get(dev, 0) + round(float(m.group(2)) * MIB)
        elif m := _RE_OUTPUT.search(line):
            dev = device_of_buffer(m.group(1))
            found.output[dev] = found.output.get(dev, 0) + round(float(m.group(2)) * MIB)
        elif m := _RE_LAYER.search(line):
            layers[int(m.group(1))] = device_of_buffer(m.group(2))
        elif m := _RE_N_CTX.search(line):
            found.n_ctx = int(m.group(1))
        elif _RE_OVERRIDE.search(line):
            found.overridden += 1
    found.layer_devices = [layers[i] for i in sorted(layers)]
    return found


class DryRunCrashed(PeregrineError):
    """The child process died from a signal (a llama.cpp GGML_ASSERT or abort)."""


def measure(
    load: LoadRequest,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    python: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> MeasuredMemory:
    """Measures `load` by a dry run in a child process; raises PeregrineError on failure."""
    env = dict(os.environ if environ is None else environ)
    # The child imports this package, wherever the parent found it.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # An abort should report its assert line, not a gdb backtrace.
    env["GGML_NO_BACKTRACE"] = "1"
    if load.runtime:
        lib = Paths.from_env(env).runtimes / load.runtime / "lib"
        if not lib.is_dir():
            raise PeregrineError(f"runtime {load.runtime!r} is not installed ({lib} is missing)")
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    cmd = module_argv("engine.planning.probe", python)
    cmd += ["--json", "--load", load.model_dump_json()]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            check=False,
            creationflags=NO_WINDOW,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeregrineError(f"the memory dry run did not finish within {timeout_s:.0f} s") from exc
    reply: dict[str, Any] | None = None
    try:
        parsed = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
        reply = parsed if isinstance(parsed, dict) else None
    except json.JSONDecodeError:
        reply = None
    if proc.returncode == 0 and reply and reply.get("ok"):
        return MeasuredMemory.from_json(reply)
    if reply and reply.get("error"):
        raise PeregrineError(f"the memory dry run failed: {reply['error']}")
    if proc.returncode < 0:
        why = crash_reason(proc.returncode, proc.stderr)
        raise DryRunCrashed(f"the memory dry run crashed {why}")
    raise PeregrineError(
        f"the memory dry run failed (exit {proc.returncode}): {_last_line(proc.stderr) or 'no output'}"
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _dry_run(load: LoadRequest) -> dict[str, Any]:
    """Child side: load without allocating and return the logged sizes."""
    from engine.runtimes import load_backends

    # A backend-DL build registers its backend modules only when asked (docs/api.md).
    env_lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    load_backends(Path(env_lib) if env_lib else None)
    import llama_cpp

    log_lines: list[str] = []

    def on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        if text:
            log_lines.append(text.decode("utf-8", "replace"))

    # Keep the ctypes callback referenced for as long as llama.cpp may call it.
    callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        return _dry_run_logged(load, log_lines)
    finally:
        # Back to llama.cpp's default (stderr) before the callback can be freed.
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))


def _dry_run_logged(load: LoadRequest, log_lines: list[str]) -> dict[str, Any]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    if not Path(load.model).is_file():
        return {"ok": False, "error": f"model file not found: {load.model}"}

    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = load.n_gpu_layers
    mparams.no_alloc = True
    mparams.load_mode = 0  # NONE: MMAP/MLOCK abort under no_alloc (measured)
    mparams.use_mmap = False
    split_keepalive = None
    overrides_keepalive = None
    overrides_keepalive = expert_overrides(load)
    if overrides_keepalive is not None:
        mparams.tensor_buft_overrides = ctypes.cast(overrides_keepalive, ctypes.c_void_p)
    if load.tensor_split:
        split_keepalive = (ctypes.c_float * len(load.tensor_split))(*load.tensor_split)
        mparams.tensor_split = ctypes.cast(split_keepalive, ctypes.POINTER(ctypes.c_float))
    model = llama_cpp.llama_model_load_from_file(load.model.encode(), mparams)
    if not model:
        return {
            "ok": False,
            "error": f"llama.cpp could not load the model: {_log_error(log_lines)}",
        }
    try:
        weights_total = llama_cpp.llama_model_size(model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = load.n_ctx
        cparams.n_batch = load.n_batch
        cparams.n_ubatch = load.n_ubatch
        cparams.n_seq_max = load.n_parallel
        cparams.kv_unified = load.kv_unified
        cparams.type_k = KV_TYPE_IDS[load.type_k]
        cparams.type_v = KV_TYPE_IDS[load.type_v]
        cparams.flash_attn_type = _FLASH_ATTN_TYPE[load.flash_attn]
        if load.threads:
            cparams.n_threads = cparams.n_threads_batch = load.threads
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            return {
                "ok": False,
                "error": f"llama.cpp could not create the context: {_log_error(log_lines)}",
            }
        llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
        del split_keepalive, overrides_keepalive

    measured = parse_log("".join(log_lines))
    measured.weights_total = int(weights_total)
    measured.gpu_devices = _gpu_device_names()
    return {"ok": True, **measured.to_json()}


class BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override` (pattern, buffer type)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def expert_tensor_patterns(load: LoadRequest) -> list[str]:
    r"""The regexes of the MoE expert tensors a load keeps in system RAM.

    `expert_offload`: one pattern for every layer (llama-server's --cpu-moe).
    `n_cpu_moe` N: one pattern per layer 0..N-1, built as llama-server builds them
    for --n-cpu-moe (common/common.h llm_add_n_cpu_ffn_overrides): `blk\.7\.ffn_...`
    cannot match blk.17, since the layer number is followed by a dot.
    """
    if load.expert_offload:
        return [EXPERT_TENSOR_PATTERN]
    return [rf"blk\.{il}{EXPERT_TENSOR_PATTERN}" for il in range(load.n_cpu_moe)]


def expert_overrides(load: LoadRequest) -> ctypes.Array[BuftOverride] | None:
    """The `tensor_buft_overrides` array for a load's expert offload, or None without one.

    Keep the returned array alive until the model is loaded.
    """
    patterns = expert_tensor_patterns(load)
    return cpu_expert_overrides(*patterns) if patterns else None


def cpu_expert_overrides(*patterns: str) -> ctypes.Array[BuftOverride]:
    """A NULL-terminated override list that keeps tensors matching `patterns` in host memory.

    llama-cpp-python leaves `tensor_buft_overrides` as an untyped pointer; this builds
    the array for it. Keep the returned array (it owns the pattern strings) alive
    until the model is loaded.
    """
    patterns = patterns or (EXPERT_TENSOR_PATTERN,)
    from engine.planning.hardware import load_ggml

    lib = load_ggml()
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    cpu = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu:
        raise PeregrineError("llama.cpp has no CPU device to keep expert tensors on")
    buft = lib.ggml_backend_dev_buffer_type(cpu)
    arr = (BuftOverride * (len(patterns) + 1))()  # zeroed: the last entry is the terminator
    for entry, pattern in zip(arr, patterns, strict=False):
        entry.pattern = pattern.encode()
        entry.buft = buft
    return arr


def _gpu_device_names() -> list[str]:
    from engine.planning.hardware import probe_ggml_devices

    return [g.name for g in probe_ggml_devices(None)]


def _log_error(lines: Sequence[str]) -> str:
    text = "".join(lines)
    errors = [line for line in text.splitlines() if "error" in line.lower() or "failed" in line]
    return (errors[-1] if errors else _last_line(text) or "no details").strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: prints one JSON line with the measured sizes."""
    parser = argparse.ArgumentParser(prog="python -m engine.planning.probe")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the only mode)")
    parser.add_argument("--load", required=True, help="a LoadRequest as JSON")
    args = parser.parse_args(argv)
    try:
        load = LoadRequest.model_validate_json(args.load)
    except ValidationError as exc:
        print(json.dumps({"ok": False, "error": f"bad LoadRequest: {exc.errors()[0]['msg']}"}))
        return 2
    reply = _dry_run(load)
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
