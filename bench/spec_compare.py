"""Speculative decoding with one active slot: this checkout against an earlier one, same run.

    git worktree add ../base BASE_COMMIT         # the code to compare against
    .venv/bin/python -m bench.spec_compare --baseline-tree ../base [--rounds 3]

Runs `bench.speculative`'s n-gram section (the built-in model, one request at
a time, in-process) once per round for each tree, alternating which goes
first, with this checkout's virtual environment (same llama.cpp build: only
the engine's Python differs), both with an f16 KV cache. Per prompt it reports the median tok/s of plain
decoding and of `auto` and `ngram-8` speculation for both trees, and this
checkout's rate over the baseline's. The parallel-slots work (docs/benchmarks.md)
set the target: speculation with one active slot within 3% of before (>= 0.97).
llama-server rows are skipped. Writes bench/results/spec_compare.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
RESULTS = HERE / "bench" / "results" / "spec_compare.json"
MODES = ("plain", "auto", "ngram-8")


def run_tree(tree: Path, max_tokens: int) -> dict[str, dict[str, float]]:
    """One `bench.speculative` run (n-gram section, one repetition) in `tree`: tok/s per prompt and mode."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speculative.json"
        cmd = [sys.executable, "-m", "bench.speculative", "--reps", "1"]
        # f16 KV: an older bench.speculative took --kv but loaded its models with the
        # default (f16); a q8_0 cache would slow only this checkout's verify batches.
        cmd += ["--max-tokens", str(max_tokens), "--json", str(out), "--kv", "f16"]
        help_text = subprocess.run(
            [sys.executable, "-m", "bench.speculative", "--help"],
            cwd=tree,
            env=_env(tree),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if "--sections" in help_text:
            cmd += ["--sections", "ngram"]
        subprocess.run(cmd, cwd=tree, env=_env(tree), check=True, stderr=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
    rates: dict[str, dict[str, float]] = {}
    for row in rows:
        plain = float(row["plain_tok_s"])
        rates[row["prompt"]] = {
            "plain": plain,
            "auto": plain * float(row["auto_ratio"]),
            "ngram-8": plain * float(row["ngram-8_ratio"]),
        }
    return rates


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["LLAMA_SERVER_BIN"] = "/nonexistent"  # no llama-server rows: not compared here
    return env


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spec_compare")
    parser.add_argument("--baseline-tree", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    trees = {"baseline": args.baseline_tree.resolve(), "current": HERE}
    runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            runs[name].append(run_tree(trees[name], args.max_tokens))
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    for prompt in runs["current"][0]:
        row: dict[str, Any] = {"prompt": prompt}
        for mode in MODES:
            base = statistics.median(run[prompt][mode] for run in runs["baseline"])
            cur = statistics.median(run[prompt][mode] for run in runs["current"])
            row[f"{mode}_baseline"] = round(base, 1)
            row[f"{mode}_current"] = round(cur, 1)
            row[f"{mode}_ratio"] = round(cur / base, 3)
        rows.append(row)
    summary = {
        f"{mode}_geomean_ratio": round(
            math.exp(statistics.fmean(math.log(row[f"{mode}_ratio"]) for row in rows)), 3
        )
        for mode in MODES
    }
    print(f"{'prompt':22s}" + "".join(f"{m + ' cur/base':>18s}" for m in MODES))
    for row in rows:
        cells = "".join(
            f"{row[f'{m}_current']:>7.1f}/{row[f'{m}_baseline']:<6.1f}{row[f'{m}_ratio']:>5.2f}"
            for m in MODES
        )
        print(f"{row['prompt']:22s}{cells}")
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    commits = {
        name: subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        for name, tree in trees.items()
    }
    record = {"rows": rows, "summary": summary, "commits": commits, "rounds": args.rounds}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
