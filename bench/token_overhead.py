"""The decode thread's own time per token, in process: what a token costs outside llama_decode.

    .venv/bin/python -m bench.token_overhead [--tree DIR] [--tokens 300] [--requests 5]

Loads the built-in model (2 threads, one slot's worth of context), generates
`--requests` greedy answers of `--tokens` tokens through the engine's Decoder,
times every `llama_decode` call with a wrapper, and prints the median over the
requests of (wall time - time inside llama_decode) / tokens, in µs, with the
wall time per token. `--tree` runs the engine code of another checkout (a
`git worktree` of an earlier commit) with this environment's llama.cpp build,
so two versions can be compared in alternating runs (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.token_overhead")
    parser.add_argument("--tree", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
        for name in [m for m in sys.modules if m == "engine" or m.startswith("engine.")]:
            del sys.modules[name]

    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    import engine.backend.llama as backend
    from engine.backend.llama import LlamaModel, SamplingParams
    from engine.decoding.decoder import Decoder
    from engine.decoding.prefix_cache import PrefixStateCache
    from engine.decoding.request import GenerationRequest, SpecParams
    from engine.default_model import default_model_path
    from engine.wire.control import LoadRequest

    model = LlamaModel(LoadRequest(model=str(default_model_path()), n_ctx=2048, threads=2))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    text = "<|im_start|>user\nWrite a long story about owls.<|im_end|>\n<|im_start|>assistant\n"
    prompt = model.tokenize(text, add_special=False, parse_special=True)
    decode = llama_cpp.llama_decode
    inside = [0.0]

    def timed(ctx: object, batch: object) -> int:
        start = time.perf_counter()
        try:
            return int(decode(ctx, batch))
        finally:
            inside[0] += time.perf_counter() - start

    backend.llama_cpp.llama_decode = timed  # type: ignore[attr-defined]
    outside_us, wall_ms = [], []
    for _ in range(args.requests):
        decoder.drop_context()
        req = GenerationRequest(
            list(prompt),
            SamplingParams(temperature=0.0),
            args.tokens,
            speculative=SpecParams(type="none"),
        )
        inside[0] = 0.0
        start = time.perf_counter()
        result = decoder.generate(req, lambda _text: None)
        wall = time.perf_counter() - start
        n = max(result.completion_tokens, 1)
        outside_us.append((wall - inside[0]) / n * 1e6)
        wall_ms.append(wall / n * 1e3)
    print(
        f"{args.tree or 'this checkout'}: {statistics.median(outside_us):.0f} µs per token "
        f"outside llama_decode, {statistics.median(wall_ms):.2f} ms per token in all "
        f"(median of {args.requests} requests of {args.tokens} tokens)"
    )
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
