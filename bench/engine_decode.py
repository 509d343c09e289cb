"""Decode rate through the engine's socket vs llama-cpp-python in process (issue 3).

    .venv/bin/python -m bench.engine_decode                 # 256 tokens, 3 alternating rounds
    .venv/bin/python -m bench.engine_decode --tokens 128 --repeats 5 --no-llama-server

Every contender gets the same default model, n_ctx 2048, flash attention on,
2 threads, greedy sampling, the same chat and the same max_tokens:

- `llama-cpp-python`: `Llama(...).create_chat_completion(stream=True)` in this process;
- `engine spec=none`: `peregrine serve` over HTTP/SSE, speculation off (the pure loop);
- `engine spec=auto`: the same engine with its default speculation;
- `llama-server`: upstream's server from the same llama.cpp, when bench/llama_server.py finds it.

Rate = (tokens - 1) / (last content chunk - first content chunk), measured by
this client for all of them, so prompt evaluation and start-up are left out and
socket, JSON and SSE costs are left in. The contenders run in rotating order in
each round; each round's ratio divides by that round's llama-cpp-python rate,
and the report gives the median ratio (the CPU is shared, so absolute rates
drift between rounds more than the ratios do). Target: engine/in-process >= 0.97.
Writes a table to stdout and the full record to bench/results/engine_decode.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil

log = logging.getLogger("bench.engine_decode")

RESULTS = Path(__file__).resolve().parent / "results"
N_CTX = 2048
THREADS = 2
TARGET = 0.97
BASELINE = "llama-cpp-python"
# Asks for more text than 256 tokens so greedy decoding runs to max_tokens, not EOS.
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": "Write a long, detailed essay about the history of bridges, from "
        "ancient stone arches to modern suspension bridges. Use many paragraphs.",
    },
]


@dataclass
class StreamResult:
    """One streamed answer as the client saw it (perf_counter seconds)."""

    t_sent: float
    t_first: float | None = None  # first chunk with non-empty content
    t_last: float | None = None  # last chunk with non-empty content
    content_chunks: int = 0
    arrivals: list[float] = field(default_factory=list)  # of every content chunk
    text: str = ""
    finish_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.t_first is None else (self.t_first - self.t_sent) * 1000.0

    def rate(self, n_tokens: int) -> float | None:
        """Tokens per second between the first and last content chunk."""
        if self.t_first is None or self.t_last is None or n_tokens < 2:
            return None
        span = self.t_last - self.t_first
        return (n_tokens - 1) / span if span > 0 else None

    def median_gap_ms(self) -> float | None:
        """Median time between content chunks: robust to the stalls a shared CPU causes.

        Meaningful for one-token-per-chunk streams only; speculation delivers
        accepted drafts in bursts, which pulls the median towards zero.
        """
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return statistics.median(gaps) * 1000.0 if gaps else None


def _consume(result: StreamResult, chunk: dict[str, Any]) -> None:
    """Folds one OpenAI chat.completion.chunk into `result`, stamping its arrival."""
    now = time.perf_counter()
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            if result.t_first is None:
                result.t_first = now
            result.t_last = now
            result.content_chunks += 1
            result.arrivals.append(now)
            result.text += content
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    if "timings" in chunk:
        result.timings = dict(chunk["timings"])


def stream_chat(
    client: httpx.Client, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> StreamResult:
    """Posts a streaming chat request and times its SSE chunks client-side."""
    result = StreamResult(t_sent=time.perf_counter())
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            _consume(result, chunk)
    return result


def stream_in_process(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> StreamResult:
    """The baseline: llama-cpp-python's own streaming chat completion, timed the same way."""
    result = StreamResult(t_sent=time.perf_counter())
    chunks: Iterator[dict[str, Any]] = llm.create_chat_completion(
        messages=messages,
        stream=True,
        max_tokens=max_tokens,
        temperature=0.0,
        repeat_penalty=1.0,
        seed=0,
    )
    for chunk in chunks:
        _consume(result, chunk)
    return result


@dataclass
class Quiet:
    """How long to wait for a calm CPU before each run, and how calm."""

    min_idle: float = 0.85
    max_wait: float = 60.0


class CpuWatch:
    """Measures the CPU that other programs took during a run: the noise of a shared machine.

    Busy time of the whole machine minus that of our own processes (this one and
    the servers under test), as a share of all cores over the run's wall time.
    """

    def __init__(self, own_pids: Sequence[int] = ()) -> None:
        self._procs = [psutil.Process()] + [psutil.Process(p) for p in own_pids]
        self._start: tuple[float, float, float] | None = None

    def _busy(self) -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    def _own(self) -> float:
        total = 0.0
        for proc in self._procs:
            try:
                c = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue  # a server that has exited holds no CPU
            total += c.user + c.system
        return total

    def start(self) -> None:
        self._start = (time.monotonic(), self._busy(), self._own())

    def others_share(self) -> float:
        """Share of the machine (0..1) used by other programs since `start`."""
        assert self._start is not None, "start() first"
        t0, busy0, own0 = self._start
        wall = time.monotonic() - t0
        if wall <= 0:
            return 0.0
        others = (self._busy() - busy0) - (self._own() - own0)
        return max(0.0, others / (wall * (psutil.cpu_count() or 1)))


def wait_for_quiet(min_idle: float, max_wait: float) -> float:
    """Waits, up to `max_wait` seconds, until the CPUs are at least `min_idle` idle.

    Returns the last idle share seen. Not a correctness wait: a bench on a shared
    machine starts each run in a calm moment when one comes, and goes on anyway
    (recording the idle share) when none does.
    """
    deadline = time.monotonic() + max_wait
    while True:
        idle = 1.0 - float(psutil.cpu_percent(interval=1.0)) / 100.0
        if idle >= min_idle or time.monotonic() >= deadline:
            return idle


def engine_bench_parser(prog: str, out: Path) -> argparse.ArgumentParser:
    """The options both engine benchmarks share (model, rounds, llama-server, output, quiet)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--model", type=Path, help="a local GGUF (default: the built-in model)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--no-llama-server", action="store_true", help="skip llama-server even if built"
    )
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument(
        "--min-idle",
        type=float,
        default=Quiet.min_idle,
        help="wait before each run until this share of the CPUs is idle (default 0.85)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=Quiet.max_wait,
        help="...but at most this many seconds (default 60; 0: never wait)",
    )
    return parser


def quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError as exc:
        log.debug("no /proc/cpuinfo: %s", exc)
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "gpu": None,
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "load_average": list(os.getloadavg()),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and engine files that differed from it (others work in this tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("git %s failed: %s", " ".join(args), exc)
            return ""
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "engine_changes": git("status", "--porcelain", "--", "engine").splitlines(),
    }


@dataclass
class Contender:
    """A named way of producing one streamed answer of `max_tokens` tokens."""

    name: str
    run: Callable[[int], StreamResult]
    # Tokens generated: from the server's timings, or from the finish reason.
    count: Callable[[StreamResult, int], int]


def _count_from_timings(result: StreamResult, max_tokens: int) -> int:
    return int(result.timings.get("predicted_n", 0))


def _count_in_process(llm: Any) -> Callable[[StreamResult, int], int]:
    def count(result: StreamResult, max_tokens: int) -> int:
        if result.finish_reason == "length":
            return max_tokens
        # Stopped early (EOS): re-tokenize the text, which can be off by a token.
        return len(llm.tokenize(result.text.encode(), add_bos=False, special=False))

    return count


def _http_contender(name: str, client: httpx.Client, extra: dict[str, Any]) -> Contender:
    def run(max_tokens: int) -> StreamResult:
        body = {
            "messages": MESSAGES,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "repeat_penalty": 1.0,
            "seed": 0,
            **extra,
        }
        return stream_chat(client, body)

    return Contender(name, run, _count_from_timings)


def measure(
    contenders: Sequence[Contender],
    tokens: int,
    repeats: int,
    watch: CpuWatch,
    quiet: Quiet,
) -> list[dict[str, Any]]:
    """Runs every contender once per round, in rotating order; one record per run."""
    for c in contenders:  # warm-up: page the weights in, fill caches, start threads
        c.run(16)
    records = []
    for rnd in range(repeats):
        shift = rnd % len(contenders)
        for c in [*contenders[shift:], *contenders[:shift]]:
            idle = wait_for_quiet(quiet.min_idle, quiet.max_wait)
            load = os.getloadavg()[0]
            watch.start()
            r = c.run(tokens)
            others = watch.others_share()
            n = c.count(r, tokens)
            rate = r.rate(n)
            log.info(
                "round %d %-18s %3d tokens %6.1f tok/s  (idle before %.0f%%, others during %.0f%%)",
                rnd + 1,
                c.name,
                n,
                rate or 0.0,
                idle * 100,
                others * 100,
            )
            records.append(
                {
                    "round": rnd + 1,
                    "contender": c.name,
                    "tokens": n,
                    "content_chunks": r.content_chunks,
                    "finish_reason": r.finish_reason,
                    "ttft_ms": r.ttft_ms,
                    "client_tok_s": rate,
                    "median_gap_ms": r.median_gap_ms(),
                    "load_average_1min": load,
                    "idle_before": idle,
                    "others_cpu_share": others,
                    "timings": r.timings,
                    "text": r.text,
                }
            )
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median rate and median per-round ratio to the in-process baseline, per contender."""
    base = {r["round"]: r["client_tok_s"] for r in records if r["contender"] == BASELINE}
    base_gap = {r["round"]: r["median_gap_ms"] for r in records if r["contender"] == BASELINE}
    base_text = next((r["text"] for r in records if r["contender"] == BASELINE), None)
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["contender"] for r in records):
        mine = [r for r in records if r["contender"] == name]
        rates = [r["client_tok_s"] for r in mine if r["client_tok_s"]]
        ratios = [
            r["client_tok_s"] / base[r["round"]]
            for r in mine
            if r["client_tok_s"] and base.get(r["round"])
        ]
        gap_ratios = [
            base_gap[r["round"]] / r["median_gap_ms"]
            for r in mine
            if r["median_gap_ms"] and base_gap.get(r["round"])
        ]
        server = [
            float(r["timings"]["predicted_per_second"])
            for r in mine
            if r["timings"].get("predicted_per_second")
        ]
        drafted = sum(int(r["timings"].get("draft_n", 0)) for r in mine)
        accepted = sum(int(r["timings"].get("draft_n_accepted", 0)) for r in mine)
        out[name] = {
            "tokens": [r["tokens"] for r in mine],
            "rates": rates,
            "median_tok_s": statistics.median(rates) if rates else None,
            "ratios": ratios,
            "median_ratio": statistics.median(ratios) if ratios else None,
            "gap_ratios": gap_ratios,
            "median_gap_ratio": statistics.median(gap_ratios) if gap_ratios else None,
            "server_median_tok_s": statistics.median(server) if server else None,
            "draft_n": drafted,
            "draft_n_accepted": accepted,
            "same_text_as_baseline": all(r["text"] == base_text for r in mine),
        }
    return out


def render(summary: dict[str, dict[str, Any]], tokens: int, repeats: int) -> str:
    """A Markdown table, as pasted into docs/benchmarks.md."""
    lines = [
        f"| contender | tokens | client tok/s (median of {repeats}) | server-reported tok/s "
        f"| ratio to {BASELINE} (median) | per-round ratios "
        "| ratio by median token gap | drafted / accepted | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        med = f"{s['median_tok_s']:.1f}" if s["median_tok_s"] else "-"
        srv = f"{s['server_median_tok_s']:.1f}" if s["server_median_tok_s"] else "-"
        ratio = f"{s['median_ratio']:.3f}" if s["median_ratio"] else "-"
        rounds = ", ".join(f"{x:.3f}" for x in s["ratios"])
        draft = f"{s['draft_n']} / {s['draft_n_accepted']}" if s["draft_n"] else "-"
        gap = f"{s['median_gap_ratio']:.3f}" if s["median_gap_ratio"] else "-"
        if s["draft_n"]:
            gap = "n/a (drafts arrive in bursts)"
        toks = "/".join(str(t) for t in sorted(set(s["tokens"])))
        same = "yes" if s["same_text_as_baseline"] else "no"
        lines.append(
            f"| {name} | {toks} | {med} | {srv} | {ratio} | {rounds} | {gap} | {draft} | {same} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = engine_bench_parser("python -m bench.engine_decode", RESULTS / "engine_decode.json")
    parser.add_argument(
        "--tokens", type=int, default=256, help="max_tokens per answer (default 256)"
    )
    args = parser.parse_args(argv)
    quiet_logging()

    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    from bench.llama_server import start_llama_server, stop_llama_server
    from engine.default_model import default_model_path
    from tests.engine_proc import running_engine

    model = args.model or default_model_path()
    started = time.time()
    info = machine()
    code = code_version()
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=True,
        n_gpu_layers=0,
        seed=0,
        verbose=False,
    )
    contenders = [
        Contender(
            BASELINE,
            lambda n: stream_in_process(llm, MESSAGES, n),
            _count_in_process(llm),
        )
    ]
    with ExitStack() as stack:
        engine = stack.enter_context(
            running_engine(
                "--model",
                str(model),
                "--ctx",
                str(N_CTX),
                "--threads",
                str(THREADS),
                "--flash-attn",
                "on",
            )
        )
        client = stack.enter_context(engine.client(timeout=300.0))
        contenders.append(
            _http_contender("engine spec=none", client, {"speculative": {"type": "none"}})
        )
        contenders.append(_http_contender("engine spec=auto", client, {}))
        pids = [engine.proc.pid]
        ls_args = ["-m", str(model), "-c", str(N_CTX), "-t", str(THREADS), "-tb", str(THREADS)]
        ls_args += ["-fa", "on", "-ngl", "0", "-np", "1"]
        server = None if args.no_llama_server else start_llama_server(ls_args)
        if server is not None:
            base_url, proc = server
            stack.callback(stop_llama_server, proc)
            pids.append(proc.pid)
            ls_client = stack.enter_context(httpx.Client(base_url=base_url, timeout=300.0))
            contenders.append(_http_contender("llama-server", ls_client, {}))
        records = measure(
            contenders,
            args.tokens,
            args.repeats,
            CpuWatch(pids),
            Quiet(args.min_idle, args.max_wait),
        )

    summary = summarize(records)
    info["load_average_after"] = list(os.getloadavg())
    table = render(summary, args.tokens, args.repeats)
    sys.stdout.write(table)
    ok = all(
        (s["median_ratio"] or 0.0) >= TARGET for n, s in summary.items() if n.startswith("engine")
    )
    sys.stdout.write(f"\nengine >= {TARGET} x {BASELINE}: {'yes' if ok else 'NO'}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "bench": "engine_decode",
                "command": "python -m bench.engine_decode " + " ".join(argv or sys.argv[1:]),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "machine": info,
                "code": code,
                "settings": {
                    "model": model.name,
                    "n_ctx": N_CTX,
                    "threads": THREADS,
                    "flash_attn": "on",
                    "sampling": "greedy",
                    "max_tokens": args.tokens,
                    "rounds": args.repeats,
                    "messages": MESSAGES,
                },
                "target_ratio": TARGET,
                "summary": summary,
                "table_markdown": table,
                "runs": records,
            },
            indent=2,
        )
        + "\n"
    )
    log.info("wrote %s", args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
