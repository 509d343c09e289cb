"""Speculative decoding vs plain decoding, same model, same run.

Usage: python -m bench.speculative [--reps 3] [--max-tokens 256] [--kv q8_0]
       [--sections ngram,draft] [--draft-model PATH] [--draft-target PATH] [--json PATH]

Every measurement starts from an empty KV cache, plain and speculative runs
alternate, and each prompt's ratio is the median over the repetitions, so the
noise of a shared machine mostly cancels out.

Two sections. `ngram`: the built-in model with n-gram drafts (and llama-server's
ngram-simple beside it, where a llama-server binary was built). `draft`: a
draft model drafting for a target, greedy (temperature 0) and sampled
(temperature 0.8, seeded; the sampled rows also report what the rule before
speculative sampling, greedy drafts kept while the target's sample equals
them, accepted of the same requests), with llama-server's --model-draft beside
them. By default the built-in model drafts for a Q4_0 copy of itself, made at
start with llama_model_quantize.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from engine.backend.llama import LlamaModel, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, SpecParams
from engine.default_model import default_model_path
from engine.gguf.chat_template import ChatTemplate
from engine.speculative.drafters import DraftModelDrafter
from engine.wire.control import LoadRequest

try:  # optional comparison rows: only where a llama-server binary was built
    from bench.engine_decode import wait_for_quiet
    from bench.llama_server import start_llama_server, stop_llama_server
except ImportError:  # pragma: no cover
    start_llama_server = None  # type: ignore[assignment]

CODE = """def compute_total(items):
    total = 0
    for item in items:
        if item.price > 0:
            total += item.price * item.quantity
    return total


def print_total(items):
    print("Total:", compute_total(items))


def average_price(items):
    if not items:
        return 0
    return compute_total(items) / len(items)
"""

PARAGRAPH = (
    "Peregrine falcons are the fastest birds in the world. When they dive to catch their prey, "
    "they can reach speeds of more than three hundred kilometres per hour. They live on every "
    "continent except Antarctica, and they often nest on tall buildings in citys, where pigeons "
    "are easy to find."
)

JSON_IN = (
    '{"name": "Ada Lovelace", "born": 1815, "languages": ["English", "French"], '
    '"address": {"city": "London", "street": "St James Square", "number": 12}, '
    '"known_for": ["Analytical Engine notes", "first published algorithm"]}'
)

PROMPTS: dict[str, tuple[str, str]] = {
    "rename-function": (
        "rewrite",
        f"Copy this code exactly, but rename compute_total to sum_prices:\n\n{CODE}",
    ),
    "fix-typo": (
        "rewrite",
        f"Repeat this paragraph exactly, fixing only the spelling mistake:\n\n{PARAGRAPH}",
    ),
    "reformat-json": (
        "rewrite",
        f"Rewrite this JSON with one key per line and two-space indentation:\n\n{JSON_IN}",
    ),
    "free-poem": ("free", "Write a poem about autumn leaves."),
    "free-explain": ("free", "Explain how a bicycle stays upright."),
}


def _mean_accepted(runs: list[dict[str, float]]) -> float | None:
    steps = sum(r["verify_steps"] for r in runs)
    return round(sum(r["draft_n_accepted"] for r in runs) / steps, 2) if steps else None


def run_once(
    decoder: Decoder,
    prompt: list[int],
    spec: SpecParams,
    max_tokens: int,
    sampling: SamplingParams | None = None,
) -> dict[str, float]:
    decoder.drop_context()
    sampling = sampling or SamplingParams(temperature=0.0)
    req = GenerationRequest(prompt, sampling, max_tokens, speculative=spec)
    t0 = time.perf_counter()
    steps_before = decoder.controller.stats.steps
    result = decoder.generate(req, lambda _text: None)
    wall = time.perf_counter() - t0
    t = result.timings
    return {
        "tokens": result.completion_tokens,
        "decode_s": t.predicted_ms / 1000.0,
        "tok_per_s": t.predicted_n / (t.predicted_ms / 1000.0) if t.predicted_ms else 0.0,
        "wall_s": wall,
        "draft_n": t.draft_n,
        "draft_n_accepted": t.draft_n_accepted,
        "verify_steps": decoder.controller.stats.steps - steps_before,
        "text": result.text,
    }


def llama_server_rate(
    base_url: str, text: str, max_tokens: int, temperature: float = 0.0, seed: int = 0
) -> dict[str, float]:
    """Decode rate and drafts of one chat request to llama-server (greedy by default)."""
    import httpx2

    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "cache_prompt": False,
    }
    r = httpx2.post(base_url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    t = r.json()["timings"]
    return {
        "tok_per_s": float(t["predicted_per_second"]),
        "draft_n": float(t.get("draft_n", 0)),
        "draft_n_accepted": float(t.get("draft_n_accepted", 0)),
        "text": r.json()["choices"][0]["message"]["content"],
    }


def quantized_copy(source: Path, folder: Path, ftype: int = 2) -> Path:
    """A copy of `source` quantized with llama_model_quantize (2: Q4_0)."""
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    out = folder / f"{source.stem}-ftype{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0:
        raise SystemExit(f"quantizing {source} failed ({rc})")
    return out


def _ratio(runs: dict[str, list[dict[str, float]]], mode: str, base: str) -> float:
    return round(
        statistics.median(
            s["tok_per_s"] / p["tok_per_s"] for s, p in zip(runs[mode], runs[base], strict=True)
        ),
        3,
    )


def _accept(runs: list[dict[str, float]]) -> float | None:
    drafted = sum(r["draft_n"] for r in runs)
    return round(sum(r["draft_n_accepted"] for r in runs) / drafted, 3) if drafted else None


def draft_rows(args: argparse.Namespace, load: LoadRequest) -> list[dict[str, object]]:
    """The draft-model section: greedy and sampled, the engine and llama-server."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    draft_path = Path(args.draft_model) if args.draft_model else default_model_path()
    target_path = (
        Path(args.draft_target)
        if args.draft_target
        else quantized_copy(default_model_path(), folder)
    )
    target = LlamaModel(load.model_copy(update={"model": str(target_path)}))
    draft = LlamaModel(load.model_copy(update={"model": str(draft_path)}))
    if draft.vocab_fingerprint() != target.vocab_fingerprint():
        raise SystemExit("the draft model's vocabulary differs from the target's")
    drafter = DraftModelDrafter(draft)
    decoder = Decoder(target, state_cache=PrefixStateCache(0), drafters=[drafter])
    template = ChatTemplate(target.meta("tokenizer.chat_template"))
    servers: dict[str, tuple[str, object]] = {}
    if start_llama_server is not None:
        common = ["-m", str(target_path), "-c", "4096", "-t", str(args.threads), "-fa", "on"]
        common += ["-ctk", args.kv, "-ctv", args.kv, "-np", "1", "--no-webui"]
        for server, extra in (
            ("ls-plain", []),
            ("ls-draft", ["--model-draft", str(draft_path), "--spec-draft-n-max", "8"]),
        ):
            started = start_llama_server([*common, *extra])
            if started is not None:
                servers[server] = started
    modes: dict[str, tuple[SpecParams, float, bool]] = {
        "plain": (SpecParams(type="none"), 0.0, True),
        "draft": (SpecParams(type="draft"), 0.0, True),
        "draft-4": (SpecParams(type="draft", n_max=4, n_min=4), 0.0, True),
        "plain@0.8": (SpecParams(type="none"), 0.8, True),
        "draft@0.8": (SpecParams(type="draft"), 0.8, True),
        "draft-4@0.8": (SpecParams(type="draft", n_max=4, n_min=4), 0.8, True),
        "compare-4@0.8": (SpecParams(type="draft", n_max=4, n_min=4), 0.8, False),
    }
    rows: list[dict[str, object]] = []
    for name, (kind, text) in PROMPTS.items():
        prompt = target.tokenize(
            template.render([{"role": "user", "content": text}]),
            add_special=False,
            parse_special=True,
        )
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for rep in range(args.reps):
            for mode, (spec, temperature, sample) in modes.items():
                if start_llama_server is not None:
                    wait_for_quiet(0.85, 20.0)
                drafter.sample = sample  # False: greedy drafts, sample and compare
                sampling = SamplingParams(temperature=temperature, seed=rep)
                runs[mode].append(run_once(decoder, prompt, spec, args.max_tokens, sampling))
            for server, (url, _proc) in servers.items():
                for temperature in (0.0, 0.8):
                    wait_for_quiet(0.85, 20.0)
                    runs.setdefault(f"{server}@{temperature}", []).append(
                        llama_server_rate(str(url), text, args.max_tokens, temperature, rep)
                    )
        drafter.sample = True
        row: dict[str, object] = {"prompt": name, "kind": kind, "section": "draft"}
        row["plain_tok_s"] = round(statistics.median(r["tok_per_s"] for r in runs["plain"]), 1)
        for mode in ("draft", "draft-4"):
            row[f"{mode}_ratio"] = _ratio(runs, mode, "plain")
            row[f"{mode}_accept"] = _accept(runs[mode])
            row[f"{mode}_identical"] = all(
                r["text"] == runs["plain"][0]["text"] for r in runs[mode]
            )
        for mode in ("draft@0.8", "draft-4@0.8"):
            row[f"{mode}_ratio"] = _ratio(runs, mode, "plain@0.8")
            row[f"{mode}_accept"] = _accept(runs[mode])
        row["compare-4@0.8_accept"] = _accept(runs["compare-4@0.8"])
        for temperature in (0.0, 0.8):
            ls_plain, ls_draft = f"ls-plain@{temperature}", f"ls-draft@{temperature}"
            if ls_plain in runs and ls_draft in runs:
                row[f"llama_server_draft@{temperature}_ratio"] = _ratio(runs, ls_draft, ls_plain)
                row[f"llama_server_draft@{temperature}_accept"] = _accept(runs[ls_draft])
        rows.append(row)
        print(json.dumps(row), flush=True)
    for _url, proc in servers.values():
        stop_llama_server(proc)  # type: ignore[arg-type]
    decoder.close()
    target.close()
    draft.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="bench/results/speculative.json")
    # q8_0 KV keeps llama.cpp's CPU flash attention on its per-row path for one
    # token and for a verify batch alike, so outputs stay byte-identical past 512
    # KV cells and every ratio compares the same text (docs/benchmarks.md).
    parser.add_argument("--kv", default="q8_0", help="KV cache type (default q8_0)")
    parser.add_argument("--sections", default="ngram,draft", help="ngram, draft or both")
    parser.add_argument("--draft-model", help="the draft model (default: the built-in model)")
    parser.add_argument(
        "--draft-target", help="the target it drafts for (default: a Q4_0 copy of the built-in)"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    load = LoadRequest(
        model=str(default_model_path()),
        n_ctx=4096,
        flash_attn="on",
        threads=args.threads,
        type_k=args.kv,
        type_v=args.kv,
    )
    draft_section = draft_rows(args, load) if "draft" in sections else []
    if "ngram" not in sections:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"rows": draft_section, "summary": {"kv": args.kv, "reps": args.reps}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        return
    model = LlamaModel(load)
    template = ChatTemplate(model.meta("tokenizer.chat_template"))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    servers: dict[str, tuple[str, object]] = {}
    if start_llama_server is not None:
        common = [
            "-m",
            str(default_model_path()),
            "-c",
            "4096",
            "-t",
            str(args.threads),
            "-fa",
            "on",
            "-ctk",
            args.kv,
            "-ctv",
            args.kv,
            "-np",
            "1",
            "--no-webui",
        ]
        for server, extra in (
            ("ls-plain", []),
            ("ls-ngram-simple", ["--spec-type", "ngram-simple", "--spec-draft-n-max", "8"]),
        ):
            started = start_llama_server([*common, *extra])
            if started is not None:
                servers[server] = started
    modes = {
        "plain": SpecParams(type="none"),
        "auto": SpecParams(type="auto"),
        "ngram-8": SpecParams(type="ngram", n_max=8, n_min=8),
    }
    rows = []
    for name, (kind, text) in PROMPTS.items():
        prompt = model.tokenize(
            template.render([{"role": "user", "content": text}]),
            add_special=False,
            parse_special=True,
        )
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.reps):
            for mode, spec in modes.items():  # alternate modes within each repetition
                if start_llama_server is not None:
                    wait_for_quiet(0.85, 20.0)
                runs[mode].append(run_once(decoder, prompt, spec, args.max_tokens))
            for server, (url, _proc) in servers.items():
                wait_for_quiet(0.85, 20.0)
                runs.setdefault(server, []).append(
                    llama_server_rate(str(url), text, args.max_tokens)
                )
        plain_rate = statistics.median(r["tok_per_s"] for r in runs["plain"])
        row = {"prompt": name, "kind": kind, "plain_tok_s": round(plain_rate, 1)}
        for mode in ("auto", "ngram-8"):
            ratios = [
                s["tok_per_s"] / p["tok_per_s"]
                for s, p in zip(runs[mode], runs["plain"], strict=True)
            ]
            drafted = sum(r["draft_n"] for r in runs[mode])
            accepted = sum(r["draft_n_accepted"] for r in runs[mode])
            row[f"{mode}_ratio"] = round(statistics.median(ratios), 3)
            row[f"{mode}_accept"] = round(accepted / drafted, 3) if drafted else None
            row[f"{mode}_drafted_per_run"] = drafted // args.reps
            row[f"{mode}_identical"] = all(
                r["text"] == runs["plain"][0]["text"] for r in runs[mode]
            )
        if "ls-plain" in runs and "ls-ngram-simple" in runs:
            ls = [
                n["tok_per_s"] / p["tok_per_s"]
                for n, p in zip(runs["ls-ngram-simple"], runs["ls-plain"], strict=True)
            ]
            row["llama_server_ngram_simple_ratio"] = round(statistics.median(ls), 3)
            drafted = sum(r["draft_n"] for r in runs["ls-ngram-simple"])
            accepted = sum(r["draft_n_accepted"] for r in runs["ls-ngram-simple"])
            row["llama_server_ngram_simple_accept"] = (
                round(accepted / drafted, 3) if drafted else None
            )
            row["llama_server_plain_tok_s"] = round(
                statistics.median(r["tok_per_s"] for r in runs["ls-plain"]), 1
            )
        row["auto_mean_accepted_per_step"] = _mean_accepted(runs["auto"])
        row["ngram-8_mean_accepted_per_step"] = _mean_accepted(runs["ngram-8"])
        rows.append(row)
        print(json.dumps(row), flush=True)

    def geomean(values: list[float]) -> float:
        return math.exp(sum(math.log(v) for v in values) / len(values))

    summary = {
        "rewrite_auto_geomean": round(
            geomean([r["auto_ratio"] for r in rows if r["kind"] == "rewrite"]), 3
        ),
        "rewrite_ngram8_geomean": round(
            geomean([r["ngram-8_ratio"] for r in rows if r["kind"] == "rewrite"]), 3
        ),
        "free_auto_min": min(r["auto_ratio"] for r in rows if r["kind"] == "free"),
        "threads": args.threads,
        "kv": args.kv,
        "max_tokens": args.max_tokens,
        "reps": args.reps,
    }
    ls_rows = [
        r["llama_server_ngram_simple_ratio"]
        for r in rows
        if r["kind"] == "rewrite" and "llama_server_ngram_simple_ratio" in r
    ]
    if ls_rows:
        summary["rewrite_llama_server_ngram_simple_geomean"] = round(geomean(ls_rows), 3)
    for _url, proc in servers.values():
        stop_llama_server(proc)  # type: ignore[arg-type]
    print(json.dumps(summary))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    everything = {"rows": rows + draft_section, "summary": summary}
    Path(args.json).write_text(json.dumps(everything, indent=2) + "\n")
    model.close()


if __name__ == "__main__":
    main()
