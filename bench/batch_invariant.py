"""Cost of the engine's batch-invariant mode for a K-quant model (issue 11).

    .venv/bin/python -m bench.batch_invariant
    .venv/bin/python -m bench.batch_invariant --model FILE.gguf --depths 512,2048 --repeats 3

`LoadRequest.batch_invariant` (docs/architecture.md, "Exactness") loads the model
without repacked weights and turns llama.cpp's tiled K-quant product off
(GGML_CPU_TILED_MM=0). This runs the installed llama.cpp twice, in two worker
processes of `bench.flash_attention` (same measurements: a `--prompt-tokens`
batch and `--decode-tokens` single tokens after `depth` cells, f16 KV, flash
attention on), one with llama.cpp's defaults and one in that mode, alternating
in rotating order within every round. Without `--model` it quantizes the
built-in model to Q4_K_M first, as tests/test_exactness.py does. The report
is the median over rounds of batch-invariant / default, by wall time and per
CPU second of the worker (the figure to trust on a busy machine with
`--threads 1`). Writes a table to stdout and the full record to
bench/results/batch_invariant.json. Exit status 0 (there is no target: the
mode is opt-in and this measures what it costs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.engine_decode import CpuWatch, wait_for_quiet
from bench.flash_attention import add_run_args, ask, write_record

RESULTS = Path(__file__).resolve().parent / "results" / "batch_invariant.json"
Q4_K_M = 15  # llama_ftype


def quantize_default(folder: Path) -> Path:
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    from engine.default_model import default_model_path

    out = folder / "smollm2-135m-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_K_M
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(
        str(default_model_path()).encode(), str(out).encode(), params
    )
    if rc != 0:
        raise RuntimeError(f"quantizing to Q4_K_M failed ({rc})")
    return out


def start(name: str, args: argparse.Namespace, model: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.flash_attention", "--worker", "--model", str(model)]
    cmd += ["--depths", args.depths, "--prompt-tokens", str(args.prompt_tokens)]
    cmd += ["--decode-tokens", str(args.decode_tokens), "--threads", str(args.threads)]
    env = dict(os.environ)
    env.pop("GGML_CPU_TILED_MM", None)
    if name == "batch_invariant":
        cmd.append("--no-repack")
        env["GGML_CPU_TILED_MM"] = "0"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if not json.loads(proc.stdout.readline() or "{}").get("ready"):
        raise RuntimeError(f"worker {name} did not start")
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.batch_invariant")
    parser.add_argument("--model", type=Path, default=None, help="default: a Q4_K_M copy")
    add_run_args(parser, depths="512", threads=1, out=RESULTS)
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]

    names = ["default", "batch_invariant"]
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or quantize_default(Path(tmp))
        procs = {name: start(name, args, model) for name in names}
        watch = CpuWatch([p.pid for p in procs.values()])
        try:
            for rnd in range(args.repeats):
                for depth in depths:
                    for name in names[rnd % 2 :] + names[: rnd % 2]:
                        idle = wait_for_quiet(args.min_idle, args.max_wait)
                        watch.start()
                        got = ask(procs[name], depth)
                        rec = {"round": rnd, "depth": depth, "mode": name, **got}
                        rec |= {"idle_before": idle, "others_cpu_share": watch.others_share()}
                        records.append(rec)
                        print(json.dumps(rec), file=sys.stderr, flush=True)
        finally:
            for p in procs.values():
                if p.stdin:
                    p.stdin.close()
                p.wait(30)

    lines = [
        "| cells | prompt ratio | per CPU s | decode ratio | per CPU s |",
        "|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for depth in depths:
        by = {(r["round"], r["mode"]): r for r in records if r["depth"] == depth}
        s = {
            metric: statistics.median(
                by[(i, "batch_invariant")][metric] / by[(i, "default")][metric]
                for i in range(args.repeats)
            )
            for metric in ("prompt_tps", "prompt_cpu_tps", "decode_tps", "decode_cpu_tps")
        }
        summary[str(depth)] = s
        lines.append(
            f"| {depth} | {s['prompt_tps']:.3f} | {s['prompt_cpu_tps']:.3f} "
            f"| {s['decode_tps']:.3f} | {s['decode_cpu_tps']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_record(args, summary, records, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
