"""Time to first token across the turns of a chat and after a chat switch (issue 3).

    .venv/bin/python -m bench.engine_ttft                   # 3 alternating rounds
    .venv/bin/python -m bench.engine_ttft --repeats 1 --no-llama-server

The scenario, per round and per configuration, greedy, 96-token answers:
chat A runs 8 turns, chat B one turn, then chat A gets its 9th question (the
switch back). TTFT is the client's wall clock from sending the request to the
first chunk with content; each measurement also records the server's
`prompt_n` / `cache_n`, which say how much of the prompt was evaluated anew.

Configurations (one engine process each, all running side by side):
- `engine cache on`: `peregrine serve` with its saved-chat-state cache (default --cache-ram);
- `engine cache off`: `--cache-ram 0` (only the prefix still in the context is reused);
- `llama-server cache on/off`: upstream's server with `--cache-ram` default / 0 and one
  slot, when bench/llama_server.py finds the binary.

Every round gives its chats a fresh session tag at the very start of the system
prompt, so nothing from an earlier round can be reused; within a round all
configurations get the same chats. Configurations run in
rotating order. Target: with the cache on, turn 8 within 1.5x of turn 1.
Writes a table to stdout and the full record to bench/results/engine_ttft.json.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.engine_decode import (
    CpuWatch,
    Quiet,
    code_version,
    engine_bench_parser,
    machine,
    quiet_logging,
    stream_chat,
    wait_for_quiet,
)

log = logging.getLogger("bench.engine_ttft")

RESULTS = Path(__file__).resolve().parent / "results"
N_CTX = 4096
THREADS = 2
ANSWER_TOKENS = 96
TARGET = 1.5
POINTS = ("turn 1", "turn 8", "switch back")

CHAT_A = [
    "I am planning a vegetable garden in a small backyard. Which vegetables are easiest for a beginner?",
    "How much sunlight do tomatoes need each day, and what happens if they get less?",
    "What is a good watering schedule for a raised bed in a hot, dry summer?",
    "How can I keep slugs and snails away from lettuce without using chemicals?",
    "Which plants grow well together in the same bed, and which should be kept apart?",
    "When should I start seeds indoors if my last frost date is in late April?",
    "What kind of compost should I add to the soil, and how much of it per square metre?",
    "How do I know when carrots and beetroot are ready to harvest?",
    "Can you summarise the whole plan as a short checklist for the first month?",
]
CHAT_B = ["Explain in simple words how a bicycle's gears make it easier to ride up a hill."]


@dataclass
class Target:
    """One configuration under test: an OpenAI-compatible endpoint plus extra request fields."""

    name: str
    client: httpx.Client
    extra: dict[str, Any]
    quiet: Quiet = field(default_factory=Quiet)
    watch: CpuWatch = field(default_factory=CpuWatch)


def _ask(
    target: Target, messages: list[dict[str, str]], max_tokens: int = ANSWER_TOKENS
) -> tuple[dict[str, Any], str]:
    """Sends one chat turn; returns its measurement and the answer's text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "seed": 0,
        **target.extra,
    }
    idle = wait_for_quiet(target.quiet.min_idle, target.quiet.max_wait)
    target.watch.start()
    r = stream_chat(target.client, body)
    others = target.watch.others_share()
    timings = r.timings
    return (
        {
            "ttft_ms": r.ttft_ms,
            "prompt_n": timings.get("prompt_n"),
            "cache_n": timings.get("cache_n"),
            "prompt_ms": timings.get("prompt_ms"),
            "predicted_n": timings.get("predicted_n"),
            "idle_before": idle,
            "others_cpu_share": others,
        },
        r.text,
    )


def scenario(target: Target, tag: str) -> dict[str, Any]:
    """Chat A for 8 turns, chat B for one, then chat A's 9th turn; every turn measured."""
    system_a = f"{tag}. You are a patient gardening expert who answers in a few sentences."
    system_b = f"{tag}. You are a friendly physics teacher."
    chat_a: list[dict[str, str]] = [{"role": "system", "content": system_a}]
    turns: list[dict[str, Any]] = []
    for i, question in enumerate(CHAT_A[:8], start=1):
        chat_a.append({"role": "user", "content": question})
        m, answer = _ask(target, chat_a)
        chat_a.append({"role": "assistant", "content": answer})
        turns.append({"chat": "A", "turn": i, **m})
    chat_b = [{"role": "system", "content": system_b}, {"role": "user", "content": CHAT_B[0]}]
    m, _ = _ask(target, chat_b)
    turns.append({"chat": "B", "turn": 1, **m})
    chat_a.append({"role": "user", "content": CHAT_A[8]})
    m, _ = _ask(target, chat_a)
    turns.append({"chat": "A", "turn": 9, **m})
    return {
        "turn 1": turns[0],
        "turn 8": turns[7],
        "switch back": turns[9],
        "all_turns": turns,
    }


def measure(
    targets: Sequence[Target],
    repeats: int,
    on_record: Callable[[list[dict[str, Any]]], object] = lambda records: None,
) -> list[dict[str, Any]]:
    """Runs the scenario once per target per round, in rotating order.

    `on_record` gets the records so far after every scenario, so a run cut short
    on a slow, shared machine still leaves its finished rounds on disk.
    """
    for t in targets:  # warm-up: page the weights in, start the threads
        _ask(t, [{"role": "user", "content": "Say hello."}], max_tokens=8)
    records = []
    run_id = time.time_ns() % 1_000_000
    for rnd in range(repeats):
        shift = rnd % len(targets)
        for t in [*targets[shift:], *targets[:shift]]:
            # Same chats for every target in a round (separate processes share no cache),
            # new ones each round (so no round reuses an earlier round's states).
            tag = f"Session {run_id}-{rnd + 1}"
            res = scenario(t, tag)
            log.info(
                "round %d %-24s %s",
                rnd + 1,
                t.name,
                "  ".join(
                    f"{p}: {res[p]['ttft_ms']:.0f} ms ({res[p]['prompt_n']}/{res[p]['cache_n']})"
                    for p in POINTS
                ),
            )
            records.append({"round": rnd + 1, "target": t.name, **res})
            on_record(records)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: median TTFT per point, prompt_n/cache_n per round, turn 8 / turn 1 ratios."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["target"] for r in records):
        mine = [r for r in records if r["target"] == name]
        s: dict[str, Any] = {}
        for p in POINTS:
            values = [r[p]["ttft_ms"] for r in mine if r[p]["ttft_ms"] is not None]
            s[p] = {
                "median_ttft_ms": statistics.median(values) if values else None,
                "ttft_ms": values,
                "prompt_n": [r[p]["prompt_n"] for r in mine],
                "cache_n": [r[p]["cache_n"] for r in mine],
            }
        ratios = [
            r["turn 8"]["ttft_ms"] / r["turn 1"]["ttft_ms"]
            for r in mine
            if r["turn 8"]["ttft_ms"] and r["turn 1"]["ttft_ms"]
        ]
        s["turn8_over_turn1"] = ratios
        s["median_turn8_over_turn1"] = statistics.median(ratios) if ratios else None
        out[name] = s
    return out


def _counts(point: dict[str, Any]) -> str:
    pairs = {f"{p}/{c}" for p, c in zip(point["prompt_n"], point["cache_n"], strict=True)}
    return ", ".join(sorted(pairs))


def render(summary: dict[str, dict[str, Any]], repeats: int) -> str:
    """A Markdown table, as pasted into docs/benchmarks.md."""
    lines = [
        f"| configuration | turn 1 TTFT ms | turn 8 TTFT ms | switch back TTFT ms "
        f"| turn 8 / turn 1 (median of {repeats}) | prompt_n/cache_n turn 1 | turn 8 | switch back |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        ttft = [
            f"{s[p]['median_ttft_ms']:.0f}" if s[p]["median_ttft_ms"] is not None else "-"
            for p in POINTS
        ]
        ratio = s["median_turn8_over_turn1"]
        lines.append(
            f"| {name} | {' | '.join(ttft)} | {ratio:.2f} | "
            + " | ".join(_counts(s[p]) for p in POINTS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = engine_bench_parser("python -m bench.engine_ttft", RESULTS / "engine_ttft.json")
    args = parser.parse_args(argv)
    quiet_logging()

    from bench.llama_server import start_llama_server, stop_llama_server
    from engine.default_model import default_model_path
    from tests.engine_proc import running_engine

    model = args.model or default_model_path()
    started = time.time()
    info = machine()
    code = code_version()
    common = [
        "--model",
        str(model),
        "--ctx",
        str(N_CTX),
        "--threads",
        str(THREADS),
        "--flash-attn",
        "on",
    ]

    def write(records: list[dict[str, Any]], *, complete: bool) -> bool:
        """Writes the JSON record (also after every scenario); True when the target is met."""
        summary = summarize(records)
        table = render(summary, args.repeats)
        ratio = summary.get("engine cache on", {}).get("median_turn8_over_turn1")
        ok = ratio is not None and ratio <= TARGET
        if complete:
            info["load_average_after"] = list(os.getloadavg())
            sys.stdout.write(table)
            sys.stdout.write(
                f"\nengine cache on: turn 8 within {TARGET}x of turn 1: {'yes' if ok else 'NO'}\n"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "bench": "engine_ttft",
                    "command": "python -m bench.engine_ttft " + " ".join(argv or sys.argv[1:]),
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "complete": complete,
                    "machine": info,
                    "code": code,
                    "settings": {
                        "model": model.name,
                        "n_ctx": N_CTX,
                        "threads": THREADS,
                        "flash_attn": "on",
                        "sampling": "greedy",
                        "answer_tokens": ANSWER_TOKENS,
                        "rounds": args.repeats,
                    },
                    "target_turn8_over_turn1": TARGET,
                    "summary": summary,
                    "table_markdown": table,
                    "runs": records,
                },
                indent=2,
            )
            + "\n"
        )
        return ok

    targets: list[Target] = []
    pids: list[int] = []
    with ExitStack() as stack:
        for name, extra_args in (
            ("engine cache on", []),
            ("engine cache off", ["--cache-ram", "0"]),
        ):
            engine = stack.enter_context(running_engine(*common, *extra_args))
            pids.append(engine.proc.pid)
            targets.append(Target(name, stack.enter_context(engine.client(timeout=300.0)), {}))
        if not args.no_llama_server:
            ls_common = [
                "-m",
                str(model),
                "-c",
                str(N_CTX),
                "-t",
                str(THREADS),
                "-tb",
                str(THREADS),
                "-fa",
                "on",
                "-ngl",
                "0",
                "-np",
                "1",
            ]
            for name, extra_args in (
                ("llama-server cache on", []),
                ("llama-server cache off", ["--cache-ram", "0"]),
            ):
                server = start_llama_server([*ls_common, *extra_args])
                if server is None:
                    break
                base_url, proc = server
                stack.callback(stop_llama_server, proc)
                pids.append(proc.pid)
                client = stack.enter_context(httpx.Client(base_url=base_url, timeout=300.0))
                targets.append(Target(name, client, {}))
        # Every turn waits for a calm CPU; the others' share is charged to the servers' pids.
        watch = CpuWatch(pids)
        quiet = Quiet(args.min_idle, args.max_wait)
        for t in targets:
            t.watch, t.quiet = watch, quiet
        records = measure(targets, args.repeats, lambda so_far: write(so_far, complete=False))
    ok = write(records, complete=True)
    log.info("wrote %s", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
