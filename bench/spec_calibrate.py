"""Speculation calibration on one machine: the figures the controller's priors come from.

Usage:
    python -m bench.spec_calibrate --model TARGET.gguf [--draft-model DRAFT.gguf]
        [--gpu-layers -1] [--tokens 128] [--reps 3] [--llama-server BIN] [--json OUT]

For a GPU machine with no network: it downloads nothing, and takes any GGUF
on disk (a real model, or the tiny MTP fixture written by
`python -m bench.spec_calibrate --write-fixture PATH`). It measures, in one run:

- plain decoding, tokens per second (greedy, from an empty cache);
- the verify cost: the wall time of one decode of k+1 rows (k = 0..16) after a
  prompt, relative to one row: the table the controller's `prior_cost` takes;
- the engine's overhead per generated token in µs: the decode loop's wall time
  minus llama_decode's (the Python loop, sampling, detokenizing);
- per drafter (n-gram, MTP heads where the model has usable ones, the draft
  model when given), with the controller choosing k and with k forced to 3:
  tokens per second, the ratio to plain, and the acceptance rate;
- at temperature 0.8 (seeded), plain decoding and each drafter that draws
  like the request (MTP heads, the draft model), verified by speculative
  sampling: the acceptance sampled requests get (`@0.8` rows);
- llama-server's plain and speculative rates beside them, when given a binary
  built from the same llama.cpp (`--llama-server`, or LLAMA_SERVER_BIN).

Acceptance rates mean nothing with random weights (the fixture): there it
only proves the command runs. It prints a Markdown table and writes the full
record to `bench/results/spec_calibrate.json` (or `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.speculative import PROMPTS, llama_server_rate
from engine.backend.llama import BatchPart, LlamaModel, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, SpecParams
from engine.default_model import default_model_path
from engine.gguf.chat_template import ChatTemplate
from engine.speculative.drafters import SamplingDrafter, build_chain
from engine.wire.control import LoadRequest

MAX_K = 16
FORCED_K = 3
GREEDY = SamplingParams(temperature=0.0)
# The sampled rows' temperature; their draws are seeded per run.
SAMPLED = 0.8


class TimedModel:
    """Counts the wall time spent in llama_decode (the target's `decode_batch`, which
    the decoder calls and `decode` goes through)."""

    def __init__(self, model: LlamaModel) -> None:
        self.decode_ms = 0.0
        inner: Callable[[Sequence[BatchPart]], float] = model.decode_batch

        def decode_batch(parts: Sequence[BatchPart]) -> float:
            ms = inner(parts)
            self.decode_ms += ms
            return ms

        model.decode_batch = decode_batch  # type: ignore[method-assign]


def load(path: str, args: argparse.Namespace, **changes: Any) -> LlamaModel:
    request = LoadRequest(
        model=path,
        n_ctx=args.ctx,
        n_gpu_layers=args.gpu_layers,
        flash_attn=args.flash_attn,
        type_k=args.kv,
        type_v=args.kv,
        threads=args.threads,
        **changes,
    )
    return LlamaModel(request)


def prompt_tokens(model: LlamaModel, text: str) -> list[int]:
    template = model.meta("tokenizer.chat_template")
    if template:
        rendered = ChatTemplate(template).render([{"role": "user", "content": text}])
        return model.tokenize(rendered, add_special=False, parse_special=True)
    return model.tokenize(text, add_special=True, parse_special=False)


def verify_costs(model: LlamaModel, prompt: list[int], reps: int) -> dict[int, float]:
    """Median ms of one decode of k+1 rows after the prompt, for k = 0..MAX_K."""
    model.clear()
    model.decode(0, prompt, 0)
    n = len(prompt)
    token = prompt[-1]
    times: dict[int, list[float]] = {k: [] for k in range(MAX_K + 1)}
    for rep in range(reps + 1):  # the first round warms up
        for k in range(MAX_K + 1):
            ms = model.decode(0, [token] * (k + 1), n, logits_all=k > 0)
            if not model.truncate(0, n):
                raise RuntimeError("the model refused to roll back: no verify costs to measure")
            if rep:
                times[k].append(ms)
    return {k: statistics.median(v) for k, v in times.items()}


def generate(
    decoder: Decoder,
    timed: TimedModel,
    prompt: list[int],
    spec: SpecParams,
    tokens: int,
    sampling: SamplingParams = GREEDY,
) -> dict[str, Any]:
    decoder.drop_context()
    request = GenerationRequest(prompt, sampling, tokens, speculative=spec)
    timed.decode_ms = 0.0
    start = time.perf_counter()
    result = decoder.generate(request, lambda _text: None)
    wall_ms = (time.perf_counter() - start) * 1000.0
    t = result.timings
    n = max(result.completion_tokens, 1)
    return {
        "tokens": result.completion_tokens,
        "tok_s": t.predicted_n / (t.predicted_ms / 1000.0) if t.predicted_ms else 0.0,
        "overhead_us_per_token": max(0.0, wall_ms - timed.decode_ms) * 1000.0 / n,
        "draft_n": t.draft_n,
        "draft_n_accepted": t.draft_n_accepted,
        "text": result.text,
    }


def server_args(args: argparse.Namespace, model: LlamaModel) -> dict[str, list[str]]:
    """llama-server's command lines: plain, and each speculative type this model allows."""
    ngl = "999" if args.gpu_layers < 0 else str(args.gpu_layers)
    common = ["-m", args.model, "-c", str(args.ctx), "-ngl", ngl, "-fa", args.flash_attn]
    common += ["-ctk", args.kv, "-ctv", args.kv, "-np", "1", "--no-webui"]
    if args.threads:
        common += ["-t", str(args.threads)]
    n_max = ["--spec-draft-n-max", "8"]
    modes = {"plain": common, "ngram": [*common, "--spec-type", "ngram-simple", *n_max]}
    if model.mtp is not None:
        modes["mtp"] = [*common, "--spec-type", "draft-mtp", *n_max]
    if args.draft_model:
        modes["draft"] = [*common, "--spec-type", "draft-simple", "-md", args.draft_model]
        modes["draft"] += ["-ngld", ngl, *n_max]
    return modes


def llama_server_rows(
    args: argparse.Namespace, model: LlamaModel, texts: list[str]
) -> dict[str, dict[str, float]]:
    """Median rate and acceptance of llama-server per mode; empty without a binary."""
    if args.no_llama_server:
        return {}
    if args.llama_server:
        os.environ["LLAMA_SERVER_BIN"] = args.llama_server
    from bench.llama_server import start_llama_server, stop_llama_server

    rows: dict[str, dict[str, float]] = {}
    for mode, cmd in server_args(args, model).items():
        try:
            started = start_llama_server(cmd, timeout=600.0)
        except RuntimeError as exc:
            print(f"llama-server {mode}: {exc}", file=sys.stderr)
            continue
        if started is None:
            return {}
        url, proc = started
        try:
            runs = [
                llama_server_rate(url, text, args.tokens)
                for _ in range(args.reps)
                for text in texts
            ]
        finally:
            stop_llama_server(proc)
        drafted = sum(r["draft_n"] for r in runs)
        rows[mode] = {
            "tok_s": statistics.median(r["tok_per_s"] for r in runs),
            "acceptance": sum(r["draft_n_accepted"] for r in runs) / drafted if drafted else 0.0,
        }
    return rows


def summarize(runs: list[dict[str, Any]], plain_rate: float) -> dict[str, Any]:
    drafted = sum(r["draft_n"] for r in runs)
    rate = statistics.median(r["tok_s"] for r in runs)
    return {
        "tok_s": round(rate, 2),
        "ratio": round(rate / plain_rate, 3) if plain_rate else None,
        "acceptance": round(sum(r["draft_n_accepted"] for r in runs) / drafted, 3)
        if drafted
        else None,
        "drafted": drafted,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spec_calibrate", description=__doc__)
    p.add_argument("--model", help="target GGUF (default: the built-in model)")
    p.add_argument("--draft-model", help="GGUF of a draft model with the same vocabulary")
    p.add_argument("--gpu-layers", type=int, default=-1, help="-1: all (default)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--kv", default="f16", help="KV cache type (default f16)")
    p.add_argument("--flash-attn", default="on", choices=("on", "off", "auto"))
    p.add_argument("--threads", type=int, default=0, help="0: the engine's choice")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--llama-server", help="llama-server binary built from the same llama.cpp")
    p.add_argument("--no-llama-server", action="store_true")
    p.add_argument("--json", default="bench/results/spec_calibrate.json")
    p.add_argument("--write-fixture", metavar="PATH", help="write the tiny MTP GGUF and exit")
    args = p.parse_args(argv)
    if args.write_fixture:
        from tests.mtp_fixture import tiny_mtp_model

        print(tiny_mtp_model(Path(args.write_fixture), default_model_path()))
        return 0
    args.model = args.model or str(default_model_path())

    model = load(args.model, args)
    draft = load(args.draft_model, args, mtp=False) if args.draft_model else None
    timed = TimedModel(model)
    decoder = Decoder(
        model, state_cache=PrefixStateCache(0), drafters=build_chain(draft, model.mtp)
    )
    texts = [text for _kind, text in PROMPTS.values()][:3]
    prompts = [prompt_tokens(model, text) for text in texts]

    costs = verify_costs(model, prompts[0], args.reps)
    relative = {k: costs[k] / costs[0] for k in costs}
    modes: dict[str, SpecParams] = {"plain": SpecParams(type="none")}
    for drafter in decoder.drafters:
        modes[drafter.name] = SpecParams(type=drafter.name, n_max=8)
        modes[f"{drafter.name}-k{FORCED_K}"] = SpecParams(
            type=drafter.name, n_max=FORCED_K, n_min=FORCED_K
        )
    modes["auto"] = SpecParams(type="auto", n_max=8)
    # Sampled rows: plain, and the drafters that draw like the request.
    sampled = {f"plain@{SAMPLED}": SpecParams(type="none")}
    for drafter in decoder.drafters:
        if isinstance(drafter, SamplingDrafter):
            sampled[f"{drafter.name}@{SAMPLED}"] = SpecParams(type=drafter.name, n_max=8)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in [*modes, *sampled]}
    for rep in range(args.reps):
        for i, prompt in enumerate(prompts):
            for mode, spec in modes.items():  # alternating modes: drift hits all alike
                runs[mode].append(generate(decoder, timed, prompt, spec, args.tokens))
            seeded = SamplingParams(temperature=SAMPLED, seed=rep * len(prompts) + i)
            for mode, spec in sampled.items():
                runs[mode].append(generate(decoder, timed, prompt, spec, args.tokens, seeded))
    plain_rate = statistics.median(r["tok_s"] for r in runs["plain"])
    sampled_rate = statistics.median(r["tok_s"] for r in runs[f"plain@{SAMPLED}"])
    table = {mode: summarize(r, plain_rate) for mode, r in runs.items() if mode in modes}
    table |= {mode: summarize(r, sampled_rate) for mode, r in runs.items() if mode in sampled}
    identical = all(
        r["text"] == plain["text"]
        for mode, rs in runs.items()
        if mode in modes
        for r, plain in zip(rs, runs["plain"], strict=True)
    )
    overhead = statistics.median(r["overhead_us_per_token"] for r in runs["plain"])
    server = llama_server_rows(args, model, texts)

    record = {
        "model": args.model,
        "draft_model": args.draft_model,
        "mtp_heads": model.mtp_heads,
        "mtp_unavailable": model.mtp_reason if model.mtp is None else None,
        "settings": vars(args),
        "verify_ms": {str(k): round(v, 3) for k, v in costs.items()},
        "verify_relative": {str(k): round(v, 3) for k, v in relative.items()},
        "overhead_us_per_token": round(overhead, 1),
        "modes": table,
        "greedy_texts_identical": identical,
        "llama_server": server,
    }
    print(render(record))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if draft is not None:
        draft.close()
    model.close()
    return 0 if identical else 1


def render(record: dict[str, Any]) -> str:
    lines = [
        f"model: {record['model']}",
        f"MTP heads: {record['mtp_heads']}"
        + (f" (unused: {record['mtp_unavailable']})" if record["mtp_unavailable"] else ""),
        f"engine overhead: {record['overhead_us_per_token']} µs per token (plain decoding)",
        f"greedy texts identical in every mode: {record['greedy_texts_identical']}",
        "",
        "| rows (k+1) | verify ms | relative to 1 row |",
        "|---:|---:|---:|",
    ]
    for k, ms in record["verify_ms"].items():
        lines.append(f"| {int(k) + 1} | {ms} | {record['verify_relative'][k]} |")
    lines += ["", "| mode | tok/s | vs plain | acceptance | llama-server tok/s | its acceptance |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    server = record["llama_server"]
    for mode, row in record["modes"].items():
        ls = server.get(mode, {})
        lines.append(
            f"| {mode} | {row['tok_s']} | {row['ratio']} | {_fmt(row['acceptance'])} "
            f"| {_fmt(ls.get('tok_s'))} | {_fmt(ls.get('acceptance'))} |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    raise SystemExit(main())
