"""Decode speed of grammar-constrained answers against free text, in one run (issue 13).

    .venv/bin/python -m bench.structured                 # 5 alternating rounds, 160 tokens
    .venv/bin/python -m bench.structured --rounds 3 --tokens 96

The engine's own decode loop in this process (the default model, n_ctx 2048,
2 threads, greedy, speculation off), one model for every contender:

- `free`: a chat answered without a grammar;
- `schema`: the same kind of chat under a JSON schema (a list of people),
  sampled as the engine does: the chain picks, the grammar checks that one
  token, and only a refused token costs a full mask of the vocabulary;
- `schema, mask every token`: the same grammar applied to the whole vocabulary
  before every pick (what a grammar sampler in the chain costs).

Rate = generated tokens / decode time (the decoder's `predicted_ms`: from the
first sampled token to the last, prompt left out). Contenders rotate in each
round; the report gives each round's ratio to that round's free-text rate and
their median (the CPU is shared: ratios drift less than rates). Target:
schema / free >= 0.8. Writes bench/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_decode import wait_for_quiet
from engine.backend.llama import LlamaModel, SamplingParams
from engine.decoding import sampling as sampling_module
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, SpecParams
from engine.default_model import default_model_path
from engine.structured import constraint as constraint_module
from engine.structured.schema import grammar_for
from engine.wire.control import LoadRequest

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8
PEOPLE = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "city": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "job": {"type": "string", "maxLength": 32},
        },
        "required": ["name", "city", "age", "job"],
        "additionalProperties": False,
    },
    "minItems": 40,
    "maxItems": 40,
}
FREE_PROMPT = "Write a long essay about the history of bridges. Use many paragraphs."
SCHEMA_PROMPT = "List forty people as JSON, each with name, city, age and job."


class Counted(constraint_module.Constraint):
    """The engine's constraint, remembering the last one made (for its check/mask counts)."""

    last: constraint_module.Constraint | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Counted.last = self


class TimedSampler(sampling_module.TokenSampler):
    """The engine's sampler, adding up the time its picks take (grammar work included)."""

    seconds = 0.0
    calls = 0

    def sample(self, row: int) -> int:
        t0 = time.perf_counter()
        try:
            return super().sample(row)
        finally:
            TimedSampler.seconds += time.perf_counter() - t0
            TimedSampler.calls += 1


class MaskEveryToken(Counted):
    """The grammar over the whole vocabulary before every pick (no single-token check)."""

    def allows(self, token: int) -> bool:
        self.checks += 1
        return False


def chat(model: LlamaModel, text: str) -> list[int]:
    rendered = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return model.tokenize(rendered, add_special=False, parse_special=True)


def run_once(
    decoder: Decoder, prompt: list[int], tokens: int, grammar: str | None
) -> dict[str, Any]:
    result = decoder.generate(
        GenerationRequest(
            prompt_tokens=prompt,
            sampling=SamplingParams(temperature=0.0),
            max_tokens=tokens,
            speculative=SpecParams(type="none"),
            grammar=grammar,
        ),
        lambda _text: None,
    )
    t = result.timings
    return {
        "tokens": t.predicted_n,
        "ms": round(t.predicted_ms, 2),
        "tok_per_s": round(t.predicted_n * 1000.0 / t.predicted_ms, 2),
        "finish": result.finish_reason,
    }


def measure(
    decoder: Decoder, prompt: list[int], tokens: int, grammar: str | None
) -> dict[str, Any]:
    """One run, with the time its token picks took (sampler chain, grammar, masks)."""
    TimedSampler.seconds, TimedSampler.calls = 0.0, 0
    out = run_once(decoder, prompt, tokens, grammar)
    out["sample_ms_per_token"] = round(
        TimedSampler.seconds * 1000.0 / max(TimedSampler.calls, 1), 4
    )
    out["decode_ms_per_token"] = round(
        out["ms"] / max(out["tokens"], 1) - out["sample_ms_per_token"], 4
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument(
        "--min-idle", type=float, default=0.85, help="CPU idle share to wait for before a run"
    )
    parser.add_argument("--max-wait", type=float, default=60.0, help="longest wait (s) for it")
    args = parser.parse_args()

    model = LlamaModel(
        LoadRequest(model=str(default_model_path()), n_ctx=2048, threads=2, flash_attn="on")
    )
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": PEOPLE}})
    t0 = time.perf_counter()
    model.grammar_tokenizer()
    tokenizer_s = time.perf_counter() - t0
    free_prompt, schema_prompt = chat(model, FREE_PROMPT), chat(model, SCHEMA_PROMPT)

    contenders = ["free", "schema", "schema, mask every token"]
    rounds: list[dict[str, Any]] = []
    sampling_module.TokenSampler = TimedSampler  # type: ignore[misc]
    for r in range(args.rounds):
        order = contenders[r % 3 :] + contenders[: r % 3]
        row: dict[str, Any] = {}
        for name in order:
            # Each request's sampler and constraint are built from these names.
            sampling_module.Constraint = MaskEveryToken if name.endswith("token") else Counted  # type: ignore[misc]
            decoder.drop_context()  # every run reads its prompt afresh
            idle = wait_for_quiet(args.min_idle, args.max_wait)
            if name == "free":
                row[name] = measure(decoder, free_prompt, args.tokens, None)
            else:
                row[name] = measure(decoder, schema_prompt, args.tokens, grammar)
                made = Counted.last
                assert made is not None
                row[name]["checks"], row[name]["masks"] = made.checks, made.masks
            row[name]["idle_before"] = round(idle, 2)
        free = row["free"]["tok_per_s"]
        row["ratio"] = {n: round(row[n]["tok_per_s"] / free, 3) for n in contenders[1:]}
        rounds.append(row)
        print(
            f"round {r + 1}: "
            + ", ".join(
                f"{n} {row[n]['tok_per_s']} tok/s (picks {row[n]['sample_ms_per_token']} ms/token)"
                for n in order
            ),
            flush=True,
        )

    medians = {n: statistics.median(r["ratio"][n] for r in rounds) for n in contenders[1:]}
    pick_ms = {
        n: statistics.median(r[n]["sample_ms_per_token"] for r in rounds) for n in contenders
    }
    decode_ms = statistics.median(r[n]["decode_ms_per_token"] for r in rounds for n in contenders)
    # The same decode cost for all: what the picks alone make of the ratio (contention-proof).
    by_pick = {
        n: round((decode_ms + pick_ms["free"]) / (decode_ms + pick_ms[n]), 3)
        for n in contenders[1:]
    }
    rates = {n: statistics.median(r[n]["tok_per_s"] for r in rounds) for n in contenders}
    print(f"\ngrammar tokenizer built in {tokenizer_s:.2f} s (once per model)")
    print(
        f"{'contender':<28}{'median tok/s':>14}{'ratio to free':>15}"
        f"{'pick ms/token':>15}{'ratio by pick cost':>20}"
    )
    for n in contenders:
        ratio = "1.000" if n == "free" else f"{medians[n]:.3f}"
        ratio_pick = "1.000" if n == "free" else f"{by_pick[n]:.3f}"
        print(f"{n:<28}{rates[n]:>14.1f}{ratio:>15}{pick_ms[n]:>15.3f}{ratio_pick:>20}")
    print(f"decode (without picks): {decode_ms:.2f} ms/token, median over all runs")
    last = rounds[-1]["schema"]
    print(
        f"schema: {last['masks']} full masks for {last['tokens']} tokens "
        f"({last['checks']} single-token checks); target >= {TARGET}"
    )
    RESULTS.mkdir(exist_ok=True)
    record = {
        "command": "python -m bench.structured "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "tokenizer_s": round(tokenizer_s, 3),
        "rounds": rounds,
        "median_ratio": medians,
        "median_tok_per_s": rates,
        "median_pick_ms_per_token": pick_ms,
        "median_decode_ms_per_token": decode_ms,
        "ratio_by_pick_cost": by_pick,
        "target": TARGET,
    }
    (RESULTS / "structured.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if medians["schema"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
