"""Profiles the engine's path of one token, from llama_decode to the SSE write, with py-spy.

    .venv/bin/pip install py-spy          # a tool, not a project dependency
    .venv/bin/python -m bench.token_profile --out profile.txt

Starts the engine (`--parallel 1`), streams `--rounds` completions of
`--tokens` tokens through the official openai client while py-spy samples the
engine's threads, then reports per thread the samples inside llama_decode and
the time per token outside it, with the functions that took it
(docs/benchmarks.md, "Parallel slots and the path of one token").
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.engine_proc import running_engine

RATE = 200


def profile(out: Path, tokens: int, rounds: int, threads: int) -> float:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = ("--ctx", "2048", "--threads", str(threads), "--parallel", "1")
    with running_engine(*args) as eng:
        client = openai.OpenAI(base_url=eng.base_url + "/v1", api_key=eng.key, max_retries=0)

        def generate() -> None:
            for _chunk in client.completions.create(
                model="default",
                prompt="Once upon a time",
                max_tokens=tokens,
                temperature=0,
                stream=True,
            ):
                pass

        generate()  # warm up
        cmd = [spy, "record", "-p", str(eng.proc.pid), "-f", "raw", "-o", str(out)]
        cmd += ["-r", str(RATE), "--nonblocking", "--threads"]
        recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        for _ in range(rounds):
            generate()
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)
    return os.getloadavg()[0]


def report(path: Path, n_tokens: int) -> None:
    total: collections.Counter[str] = collections.Counter()
    decode: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        thread = frames[0].split(":")[-1].strip()
        n = int(count)
        total[thread] += n
        # llama_decode is a C call: its samples end in decode_batch's call line.
        if "llama_decode" in stack or "decode_batch" in frames[-1]:
            decode[thread] += n
        else:
            leaves[(thread, frames[-1])] += n
    for thread, n in total.most_common():
        outside = n - decode[thread]
        us = outside / RATE / n_tokens * 1e6
        print(f"{thread}: {n} samples, {decode[thread]} in llama_decode, {us:.0f} µs/token outside")
    for (thread, leaf), n in leaves.most_common(12):
        print(f"  {n:6d}  {thread}: {leaf}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("token_profile.txt"))
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    load = profile(args.out, args.tokens, args.rounds, args.threads)
    print(f"load average {load:.2f}")
    report(args.out, args.tokens * args.rounds)


if __name__ == "__main__":
    main()
