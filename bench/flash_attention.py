"""Cost of the batch-invariant flash attention: patched vs upstream llama.cpp (issue 11).

    .venv/bin/python -m bench.flash_attention --baseline UPSTREAM_WHEEL_OR_LIB_DIR
    .venv/bin/python -m bench.flash_attention --baseline DIR --depths 512,2048,8192 --repeats 3

`--baseline` is an unpatched build of the same llama-cpp-python: a wheel from
`packaging/llama/build_wheel.py --patches-dir EMPTY_DIR` (same CMake arguments)
or its `llama_cpp/lib` folder. `--patched` defaults to the installed build.

Each build runs in its own worker process (LLAMA_CPP_LIB_PATH) with the
built-in model (or `--model`), an f16 KV cache, flash attention on, 2 threads.
A worker fills its context once to the deepest depth and saves the sequence's
state; each measurement restores it and trims it to the depth, then times:
- prompt: one batch of `--prompt-tokens` (default 512) tokens after `depth`
  cells, as tokens per second;
- decode: `--decode-tokens` (default 32) tokens one at a time after `depth`
  cells, as tokens per second.
The two workers alternate in rotating order within every round; the report is
the median over rounds of patched / upstream (1.00 = same speed, above = the
patch is faster), by wall time and per CPU second of the worker (with
`--threads 1` the latter is the figure to trust on a busy machine: no thread
spins at a barrier waiting for a descheduled one). Target: >= 0.97 for both
at every depth. Writes a table to
stdout and the full record to bench/results/flash_attention.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.engine_decode import CpuWatch, code_version, machine, wait_for_quiet

RESULTS = Path(__file__).resolve().parent / "results" / "flash_attention.json"
TARGET = 0.97


# --- worker: one llama.cpp build in its own process -------------------------


class Worker:
    """A filled context that measures prompt and decode speed at a given depth."""

    def __init__(
        self, model: str, max_depth: int, prompt_tokens: int, threads: int, repack: bool = True
    ) -> None:
        import llama_cpp

        from engine.runtimes import ensure_backends

        ensure_backends()
        import numpy as np

        self.ll = llama_cpp
        self._silence = llama_cpp.llama_log_callback(lambda *_: None)  # kept alive: C calls it
        llama_cpp.llama_log_set(self._silence, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = repack
        self.model = llama_cpp.llama_model_load_from_file(model.encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = max_depth + prompt_tokens + 256
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = 1
        cp.type_k = cp.type_v = 1  # f16
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("context creation failed")
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        rng = np.random.default_rng(0)
        self.tokens = [int(t) for t in rng.integers(100, 20000, size=max_depth + prompt_tokens)]
        for start in range(0, max_depth, 512):
            self._decode(start, min(512, max_depth - start))
        mem = llama_cpp.llama_get_memory(self.ctx)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        self.state = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(self.ctx, self.state, size, 0)
        self.mem = mem

    def _decode(self, pos: int, n: int) -> None:
        b = self.batch
        for i in range(n):
            b.token[i] = self.tokens[pos + i]
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i == n - 1 else 0
        b.n_tokens = n
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _at_depth(self, depth: int) -> None:
        self.ll.llama_memory_clear(self.mem, True)
        self.ll.llama_state_seq_set_data(self.ctx, self.state, len(self.state), 0)
        self.ll.llama_memory_seq_rm(self.mem, 0, depth, -1)

    def measure(self, depth: int, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
        self._at_depth(depth)
        t0, c0 = time.perf_counter(), time.process_time()
        self._decode(depth, prompt_tokens)
        prompt_s, prompt_cpu = time.perf_counter() - t0, time.process_time() - c0
        self._at_depth(depth)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(decode_tokens):
            self._decode(depth + i, 1)
        decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "prompt_tps": prompt_tokens / prompt_s,
            "decode_tps": decode_tokens / decode_s,
            # per CPU second of this process: with --threads 1 (no spinning at
            # barriers) this holds up on a busy machine far better than wall time
            "prompt_cpu_tps": prompt_tokens / prompt_cpu,
            "decode_cpu_tps": decode_tokens / decode_cpu,
        }


def worker_main(args: argparse.Namespace) -> int:
    w = Worker(
        args.model, max(args.depth_list), args.prompt_tokens, args.threads, not args.no_repack
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        depth = int(json.loads(line)["depth"])
        print(json.dumps(w.measure(depth, args.prompt_tokens, args.decode_tokens)), flush=True)
    return 0


# --- parent: alternate the two builds ------------------------------------------


def lib_dir(path: Path, scratch: Path) -> Path:
    """A llama_cpp/lib folder, unpacked from the wheel when given one."""
    if path.is_dir():
        return path
    with zipfile.ZipFile(path) as whl:
        members = [m for m in whl.namelist() if m.startswith("llama_cpp/lib/")]
        whl.extractall(scratch, members)
    for lib in (scratch / "llama_cpp" / "lib").iterdir():
        lib.chmod(0o755)
    return scratch / "llama_cpp" / "lib"


def installed_lib() -> Path:
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    return Path(llama_cpp.__file__).parent / "lib"


def start_worker(name: str, lib: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.flash_attention", "--worker", "--model", args.model]
    cmd += ["--depths", args.depths, "--prompt-tokens", str(args.prompt_tokens)]
    cmd += ["--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib)}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if not json.loads(proc.stdout.readline() or "{}").get("ready"):
        raise RuntimeError(f"worker {name} did not start")
    return proc


def ask(proc: subprocess.Popen[str], depth: int) -> dict[str, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({"depth": depth}) + "\n")
    proc.stdin.flush()
    return dict(json.loads(proc.stdout.readline()))


def render(summary: dict[str, Any]) -> str:
    lines = [
        "| cells | prompt tok/s upstream | patched | ratio | ratio per CPU s "
        "| decode tok/s upstream | patched | ratio | ratio per CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for depth, s in summary.items():
        lines.append(
            f"| {depth} | {s['prompt_tps']['upstream']:.1f} | {s['prompt_tps']['patched']:.1f} "
            f"| {s['prompt_ratio']:.3f} | {s['prompt_cpu_ratio']:.3f} "
            f"| {s['decode_tps']['upstream']:.1f} | {s['decode_tps']['patched']:.1f} "
            f"| {s['decode_ratio']:.3f} | {s['decode_cpu_ratio']:.3f} |"
        )
    return "\n".join(lines)


def add_run_args(parser: argparse.ArgumentParser, depths: str, threads: int, out: Path) -> None:
    """The options this benchmark shares with bench.batch_invariant."""
    parser.add_argument("--depths", default=depths)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-idle", type=float, default=0.85)
    parser.add_argument("--max-wait", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=out)


def write_record(
    args: argparse.Namespace, summary: dict[str, Any], records: list[dict[str, Any]], table: str
) -> None:
    """The full record of a run, next to the table printed."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine(),
        "code": code_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "records": records,
        "table": table,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.flash_attention")
    parser.add_argument("--baseline", type=Path, help="unpatched wheel or llama_cpp/lib folder")
    parser.add_argument(
        "--patched", type=Path, help="patched wheel or lib folder (default: installed)"
    )
    parser.add_argument("--model", default=None)
    add_run_args(parser, depths="512,2048,8192", threads=2, out=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-repack", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.depth_list = [int(d) for d in args.depths.split(",")]
    if args.model is None:
        from engine.default_model import default_model_path

        args.model = str(default_model_path())
    if args.worker:
        return worker_main(args)
    if args.baseline is None:
        parser.error("--baseline is required (an unpatched wheel or lib folder)")

    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            "upstream": lib_dir(args.baseline, Path(tmp) / "upstream"),
            "patched": lib_dir(args.patched, Path(tmp) / "patched")
            if args.patched
            else installed_lib(),
        }
        procs = {name: start_worker(name, lib, args) for name, lib in libs.items()}
        watch = CpuWatch([p.pid for p in procs.values()])
        records: list[dict[str, Any]] = []
        try:
            names = list(procs)
            for rnd in range(args.repeats):
                for depth in args.depth_list:
                    order = names[rnd % 2 :] + names[: rnd % 2]
                    for name in order:
                        idle = wait_for_quiet(args.min_idle, args.max_wait)
                        watch.start()
                        got = ask(procs[name], depth)
                        records.append(
                            {
                                "round": rnd,
                                "depth": depth,
                                "build": name,
                                **got,
                                "idle_before": idle,
                                "others_cpu_share": watch.others_share(),
                            }
                        )
                        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
        finally:
            for p in procs.values():
                if p.stdin:
                    p.stdin.close()
                p.wait(30)

    summary: dict[str, Any] = {}
    for depth in args.depth_list:
        by = {(r["round"], r["build"]): r for r in records if r["depth"] == depth}
        s: dict[str, Any] = {}
        for metric in ("prompt_tps", "decode_tps", "prompt_cpu_tps", "decode_cpu_tps"):
            ratios = [
                by[(i, "patched")][metric] / by[(i, "upstream")][metric]
                for i in range(args.repeats)
            ]
            s[metric.replace("_tps", "_ratio")] = statistics.median(ratios)
            s[metric] = {
                b: statistics.median(by[(i, b)][metric] for i in range(args.repeats)) for b in libs
            }
        summary[str(depth)] = s
    table = render(summary)
    print(table)
    write_record(args, summary, records, table)
    ok = all(s["prompt_ratio"] >= TARGET and s["decode_ratio"] >= TARGET for s in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
