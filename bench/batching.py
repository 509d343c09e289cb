"""Parallel slots: aggregate throughput at 1/2/4/8 streams, and the first token of a
short request while a 4,000-token prompt is prefilled; against llama-server -np N.

    .venv/bin/python -m bench.batching                       # both, llama-server if found
    .venv/bin/python -m bench.batching --tokens 32 --streams 1,8 --no-llama-server

Both servers get the default model, the same context (8192), 8 slots on one
unified q8_0 KV cache, flash attention on and the same threads; every client
is the official `openai` package, streaming, greedy. Each round's prompts
start with a fresh nonce so no prefix cache helps either server.

- Aggregate: N concurrent streams of `--tokens` tokens each; completion
  tokens of all streams / wall time from the first request to the last end.
- TTFT: a short chat sent 0.5 s after a 4,000-token prompt; its time to the
  first content chunk, and the same request's TTFT alone.

The CPU is shared: the load average is recorded with every figure, and the
ratios (engine / llama-server, measured in the same run) are what to quote.
Writes a table to stdout and bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from bench.llama_server import start_llama_server, stop_llama_server
from engine.default_model import default_model_path
from tests.engine_proc import running_engine

RESULTS = Path(__file__).resolve().parent / "results"
N_CTX = 8192
SLOTS = 8
TOPICS = ["rivers", "owls", "copper", "tea", "glaciers", "bees", "violins", "deserts"]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _stream(
    client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    sent = time.perf_counter()
    first: float | None = None
    n = 0
    stream = client.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return {"sent": sent, "first": first, "end": time.perf_counter(), "tokens": n}


def aggregate(client: openai.OpenAI, streams: int, tokens: int) -> dict[str, Any]:
    nonce = secrets.token_hex(4)
    results: list[dict[str, Any]] = []

    def one(i: int) -> None:
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "user", "content": f"[{nonce}-{i}] Write a long story about {topic}."}]
        results.append(_stream(client, messages, tokens))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    total = sum(r["tokens"] for r in results)
    return {
        "streams": streams,
        "tokens": total,
        "wall_s": round(wall, 3),
        "tok_per_s": round(total / wall, 2),
        "load": _load(),
    }


def ttft_during_prefill(client: openai.OpenAI) -> dict[str, Any]:
    nonce = secrets.token_hex(4)
    short = [{"role": "user", "content": f"[{nonce}] Say hello."}]
    alone = _stream(client, short, 4)
    filler = " ".join(f"Line {i}: the {TOPICS[i % 8]} note number {i}." for i in range(420))
    long_msgs = [{"role": "user", "content": f"[{nonce}] {filler}\nSummarize."}]
    background = threading.Thread(target=_stream, args=(client, long_msgs, 4))
    background.start()
    time.sleep(0.5)
    short2 = [{"role": "user", "content": f"[{nonce}x] Say hello."}]
    during = _stream(client, short2, 4)
    background.join()
    return {
        "ttft_alone_s": round(alone["first"] - alone["sent"], 3),
        "ttft_during_prefill_s": round(during["first"] - during["sent"], 3),
        "load": _load(),
    }


@contextmanager
def engine_client(threads: int) -> Iterator[openai.OpenAI]:
    args = [
        "--ctx",
        str(N_CTX),
        "--threads",
        str(threads),
        "--parallel",
        str(SLOTS),
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
        "--flash-attn",
        "on",
    ]
    with running_engine(*args) as eng:
        yield openai.OpenAI(base_url=eng.base_url + "/v1", api_key=eng.key, max_retries=0)


@contextmanager
def llama_server_client(threads: int) -> Iterator[openai.OpenAI | None]:
    started = start_llama_server(
        [
            "-m",
            str(default_model_path()),
            "-c",
            str(N_CTX),
            "-t",
            str(threads),
            "-np",
            str(SLOTS),
            "-kvu",
            "-ctk",
            "q8_0",
            "-ctv",
            "q8_0",
            "-fa",
            "on",
        ]
    )
    if started is None:
        yield None
        return
    base_url, proc = started
    try:
        yield openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    finally:
        stop_llama_server(proc)


def run(name: str, make: Callable[[], Any], streams: list[int], tokens: int) -> dict[str, Any]:
    with make() as client:
        if client is None:
            return {}
        _stream(client, [{"role": "user", "content": "warm up"}], 4)
        agg = [aggregate(client, n, tokens) for n in streams]
        ttft = ttft_during_prefill(client)
    for row in agg:
        print(
            f"{name:14s} {row['streams']} streams: {row['tok_per_s']:8.2f} tok/s "
            f"(load {row['load']})"
        )
    print(
        f"{name:14s} TTFT alone {ttft['ttft_alone_s']} s, during a 4,000-token prefill "
        f"{ttft['ttft_during_prefill_s']} s (load {ttft['load']})"
    )
    return {"aggregate": agg, "ttft": ttft}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama-server", action="store_true")
    args = p.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    record: dict[str, Any] = {"command": " ".join(sys.argv), "load_start": _load()}
    record["engine"] = run("engine", lambda: engine_client(args.threads), streams, args.tokens)
    if not args.no_llama_server:
        record["llama-server"] = run(
            "llama-server", lambda: llama_server_client(args.threads), streams, args.tokens
        )
    if record.get("llama-server"):
        for ours, theirs in zip(
            record["engine"]["aggregate"], record["llama-server"]["aggregate"], strict=True
        ):
            print(
                f"ratio at {ours['streams']} streams: {ours['tok_per_s'] / theirs['tok_per_s']:.3f}"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
