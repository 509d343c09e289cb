#!/usr/bin/env python3
"""Check a built engine runtime end to end: the engine serves a chat completion on it.

In a scratch data folder (PEREGRINE_HOME) the runtime is installed, its
self-test runs, and `peregrine serve --runtime NAME` answers a chat completion
through the openai client. The check then reports which CPU variant llama.cpp
loaded, how many layers went to a GPU device, the decode speed (for the record
only), and that the self-test passed and was cached (docs/install.md,
"Building runtimes").

    python packaging/runtimes/check_runtime.py build/runtimes/cpu
    python packaging/runtimes/check_runtime.py build/runtimes/cpu --qemu-cpu Haswell \\
        --expect-variant haswell --tokens 4
    GGML_VK_VISIBLE_DEVICES=0 python packaging/runtimes/check_runtime.py \
        build/runtimes/vulkan --gpu-layers -1

--qemu-cpu MODEL runs the self-test child and the engine under
`qemu-x86_64 -cpu MODEL` (Debian's qemu-user), an emulated CPU without this
machine's newer instructions: llama.cpp must pick a CPU variant that model has.
A process the emulated one starts runs natively (the engine's own self-test
child too, which is why the self-test is run and cached natively first), so
this script also runs the self-test child under qemu and checks that it and
the engine loaded the same variant.

ggml-vulkan uses a CPU-type device such as Mesa's lavapipe only when it is
named: on a machine without a Vulkan GPU, GGML_VK_VISIBLE_DEVICES=0.

Exit status 0 when every check passed; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.paths import Paths  # noqa: E402
from engine.runtimes import (  # noqa: E402
    MANIFEST,
    RuntimeProblem,
    RuntimeSelector,
    read_manifest,
    run_self_test,
)

# ggml's log line when it registers a backend module (ggml-backend-reg.cpp).
LOADED = re.compile(r"loaded (\S+) backend from (\S+)")
OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
CPU_MODULE = re.compile(r"libggml-cpu-([A-Za-z0-9_.]+)\.so")
# llama.cpp's log line for each device a model's layers go to.
DEVICE = re.compile(r"using device (.+?) - \d+ MiB free")
PROMPT = "Name the capital of France in one word."


class CheckFailed(Exception):
    """A check did not pass; the message says which and why."""


def say(message: str) -> None:
    print(f"check_runtime: {message}", flush=True)


def python_argv(qemu_cpu: str | None) -> list[str]:
    if not qemu_cpu:
        return [sys.executable]
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise CheckFailed("--qemu-cpu needs qemu-x86_64 (Debian: apt-get install qemu-user)")
    return [qemu, "-cpu", qemu_cpu, sys.executable]


def install(runtime: Path, home: Path) -> str:
    manifest, _ = read_manifest(runtime)  # a bad runtime.json fails here, clearly
    name = runtime.name
    target = home / "runtimes" / name
    if target.exists():  # a --home of an earlier check: its cached self-test still holds
        shutil.rmtree(target)
    shutil.copytree(runtime, target, symlinks=True)
    say(f"installed {runtime} ({manifest.backend}) as runtime {name!r} in {home}")
    return name


def self_test_under_qemu(
    lib_dir: Path, qemu_cpu: str, gpu: bool, env: dict[str, str]
) -> dict[str, Any]:
    """The self-test child under the emulated CPU: its verdict and the variant it loaded."""
    cmd = [*python_argv(qemu_cpu), "-m", "engine.runtimes", "--self-test", str(lib_dir)]
    if gpu:
        cmd.append("--gpu")
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        errors="replace",
        env={**env, "LLAMA_CPP_LIB_PATH": str(lib_dir)},
        timeout=1800,
        check=False,
    )
    seconds = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    reply = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode != 0 or not reply.get("ok"):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise CheckFailed(
            f"the self-test under qemu -cpu {qemu_cpu} failed (exit {proc.returncode}): "
            f"{reply.get('error') or tail}"
        )
    loaded = dict(LOADED.findall(proc.stderr))
    say(
        f"self-test under qemu -cpu {qemu_cpu}: decoded {reply['tokens']} tokens in "
        f"{seconds:.0f} s; CPU backend from {loaded.get('CPU', '?')}"
    )
    return {"seconds": round(seconds, 1), "cpu_module": loaded.get("CPU"), "reply": reply}


# The engine logs llama.cpp's warnings only: where a model's layers go is read from
# a load with llama.cpp's full log, done the engine's way (load_backends, then llama_cpp).
PLACEMENT_PROBE = """
import sys
from pathlib import Path
from engine.runtimes import load_backends
load_backends(Path(sys.argv[1]))
import llama_cpp
from engine.default_model import default_model_path
llama_cpp.Llama(str(default_model_path()), n_ctx=256, n_gpu_layers=int(sys.argv[2]), verbose=True)
"""


def placement(lib_dir: Path, gpu_layers: int, env: dict[str, str]) -> dict[str, Any]:
    """The devices llama.cpp puts the built-in model's layers on with this runtime."""
    proc = subprocess.run(
        [sys.executable, "-c", PLACEMENT_PROBE, str(lib_dir), str(gpu_layers)],
        capture_output=True,
        text=True,
        errors="replace",
        env={**env, "LLAMA_CPP_LIB_PATH": str(lib_dir)},
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise CheckFailed(f"loading the model with {gpu_layers} GPU layers failed: {tail}")
    offloaded = OFFLOADED.findall(proc.stderr)
    return {
        "devices": sorted(set(DEVICE.findall(proc.stderr))),
        "layers_on_gpu": f"{offloaded[-1][0]}/{offloaded[-1][1]}" if offloaded else None,
        "offloaded": int(offloaded[-1][0]) if offloaded else 0,
    }


class Engine:
    """`peregrine serve` on a free loopback port, its stderr kept."""

    def __init__(self, cmd: list[str], env: dict[str, str], timeout_s: float) -> None:
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        self.ready = self._wait_ready(timeout_s)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                event = json.loads(line)
                if event.get("event") in ("ready", "error"):
                    found.update(event)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if found.get("event") != "ready":
            why = found.get("message") or found.get("error")
            if not why and self.proc.poll() is not None:
                why = f"it exited with status {self.proc.returncode}"
            why = why or f"no ready event in {timeout_s:.0f} s"
            tail = " | ".join(self.stderr[-3:])
            self.stop()
            raise CheckFailed(f"the engine did not start: {why} ({tail})")
        return found

    @property
    def base_url(self) -> str:
        return f"http://{self.ready['host']}:{self.ready['port']}"

    def mapped_cpu_modules(self) -> list[str]:
        """The ggml-cpu variants mapped into the engine (under qemu: the emulator's process)."""
        try:
            maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        except OSError:
            return []
        return sorted(set(CPU_MODULE.findall(maps)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chat(engine: Engine, tokens: int, timeout_s: float) -> dict[str, Any]:
    """One streamed chat completion, with the engine's timings (docs/api.md)."""
    from openai import OpenAI

    client = OpenAI(
        base_url=engine.base_url + "/v1", api_key=engine.ready["api_key"], timeout=timeout_s
    )
    pieces: list[str] = []
    timings: dict[str, Any] = {}
    stream = client.chat.completions.create(
        model=engine.ready.get("model") or "default",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        extra = chunk.model_extra or {}
        if isinstance(extra.get("timings"), dict):
            timings = extra["timings"]
    text = "".join(pieces)
    if not text.strip():
        raise CheckFailed("the chat completion came back empty")

    def rate(key: str) -> float | None:
        value = timings.get(key)
        return round(float(value), 1) if isinstance(value, (int, float)) else None

    return {
        "text": text,
        "tokens": timings.get("predicted_n"),
        "prompt_tok_s": rate("prompt_per_second"),
        "decode_tok_s": rate("predicted_per_second"),
    }


def cached_self_test(home: Path, name: str) -> dict[str, Any]:
    cache = home / "cache" / "runtime-self-tests.json"
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"no cached self-test result ({cache}: {exc})") from exc
    entries = [v for k, v in data.items() if k.split("|", 1)[0] == name]
    if not entries or not all(e.get("ok") for e in entries):
        raise CheckFailed(f"the cached self-test of {name!r} did not pass: {entries}")
    return dict(entries[-1])


def check(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    runtime = args.runtime.resolve()
    if not (runtime / MANIFEST).is_file():
        raise CheckFailed(f"{runtime} is not a runtime folder (no {MANIFEST})")
    manifest, _ = read_manifest(runtime)
    name = install(runtime, home)
    env = {
        **os.environ,
        "PEREGRINE_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("LLAMA_CPP_LIB_PATH", None)
    summary: dict[str, Any] = {"runtime": name, "backend": manifest.backend}
    gpu = manifest.backend != "cpu"
    # The self-test as the engine runs it, cached where the engine looks (with this
    # check's timeout: a busy machine must not make it inconclusive). Under qemu the
    # engine's own self-test child would run natively anyway: this is that one.
    selector = RuntimeSelector(
        Paths.from_env(env),
        self_test=lambda lib, on_gpu: run_self_test(lib, on_gpu, timeout_s=args.timeout),
    )
    started = time.monotonic()
    try:
        selector.check(name)
    except RuntimeProblem as exc:
        raise CheckFailed(f"runtime {name!r} {exc}") from exc
    say(f"self-test passed in {time.monotonic() - started:.0f} s")
    if args.qemu_cpu:
        summary["qemu_cpu"] = args.qemu_cpu
        summary["qemu_self_test"] = self_test_under_qemu(
            home / "runtimes" / name / "lib", args.qemu_cpu, gpu, env
        )
    cmd = [*python_argv(args.qemu_cpu), "-m", "app.cli", "serve", "--port", "0"]
    cmd += ["--runtime", name, "--tool-self-test", "off", "--ctx", "512", "--parallel", "1"]
    if args.gpu_layers is not None:
        cmd += ["--gpu-layers", str(args.gpu_layers)]
    started = time.monotonic()
    engine = Engine(cmd, env, args.timeout)
    try:
        summary["start_s"] = round(time.monotonic() - started, 1)
        from urllib.request import Request, urlopen

        request = Request(
            engine.base_url + "/v1/engine/status",
            headers={"Authorization": f"Bearer {engine.ready['api_key']}"},
        )
        with urlopen(request, timeout=60) as response:
            status = json.loads(response.read())
        summary["status_runtime"] = status.get("runtime")
        in_use = status.get("runtime") or {}
        if in_use.get("name") != name or in_use.get("fallback_reason"):
            raise CheckFailed(f"the engine does not run on {name!r}: {in_use}")
        summary["chat"] = chat(engine, args.tokens, args.timeout)
        say(f"answer: {summary['chat']['text']!r} ({summary['chat']['decode_tok_s']} tok/s)")
        summary["cpu_modules_mapped"] = engine.mapped_cpu_modules()
    finally:
        engine.stop()
    log_text = "\n".join(engine.stderr)
    summary["backends_loaded"] = dict(LOADED.findall(log_text))
    cpu_module = summary["backends_loaded"].get("CPU")
    variant = CPU_MODULE.search(cpu_module or "")
    summary["cpu_variant"] = variant.group(1) if variant else None
    say(f"CPU backend loaded from {cpu_module}; mapped: {summary['cpu_modules_mapped']}")
    if args.qemu_cpu:
        qemu_module = summary["qemu_self_test"]["cpu_module"] or ""
        if qemu_module != cpu_module:
            raise CheckFailed(
                f"the self-test under qemu loaded {qemu_module}, the engine {cpu_module}"
            )
    if args.expect_variant and summary["cpu_variant"] != args.expect_variant:
        raise CheckFailed(
            f"llama.cpp loaded the {summary['cpu_variant']!r} CPU variant, "
            f"not {args.expect_variant!r}"
        )
    if (
        summary["cpu_modules_mapped"]
        and summary["cpu_variant"] not in summary["cpu_modules_mapped"]
    ):
        raise CheckFailed(f"the engine maps {summary['cpu_modules_mapped']}, not the logged one")
    if gpu:
        layers = -1 if args.gpu_layers is None else args.gpu_layers
        where = placement(home / "runtimes" / name / "lib", layers, env)
        summary["placement"] = where
        say(f"devices: {where['devices']}; layers on the GPU: {where['layers_on_gpu']}")
        if not where["offloaded"]:
            raise CheckFailed(
                f"no layer went to a {manifest.backend} device ({where['devices']}); ggml-vulkan "
                "uses a software device such as Mesa's lavapipe only when asked to with "
                "GGML_VK_VISIBLE_DEVICES=0"
            )
    summary["self_test"] = cached_self_test(home, name)
    say(f"self-test cached: {summary['self_test']['detail']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("runtime", type=Path, help="a runtime folder, e.g. build/runtimes/cpu")
    parser.add_argument("--qemu-cpu", metavar="MODEL", help="run under qemu-x86_64 -cpu MODEL")
    parser.add_argument("--expect-variant", metavar="NAME", help="the CPU variant to see loaded")
    parser.add_argument("--gpu-layers", type=int, help="--gpu-layers for the engine")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of the completion")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per step")
    parser.add_argument("--home", type=Path, help="the scratch data folder (default: a temp one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="peregrine-check-") as tmp:
        home = args.home or Path(tmp)
        try:
            summary = check(args, home)
        except (CheckFailed, OSError, subprocess.SubprocessError, ValueError) as exc:
            say(f"FAILED: {exc}")
            return 1
        except Exception as exc:  # the openai client's errors: one line, not a traceback
            if type(exc).__module__.split(".")[0] != "openai":
                raise
            say(f"FAILED: {exc}")
            return 1
    say("passed")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
