"""Greedy texts and CPU time of the decoder, to compare two checkouts of the engine.

    PYTHONPATH=. .venv/bin/python bench/decode_texts.py run OUT.json      # in each checkout
    python bench/decode_texts.py compare BASE.json NEW.json [BASE2.json NEW2.json ...]

`run` generates every `bench.speculative` prompt in its three modes (plain,
auto, n-gram forced to 8), 256 tokens, in process, with ONE llama.cpp thread,
and records each text, its token and draft counts, and the process CPU time it
took. One thread and CPU time (not wall time) keep the figure meaningful on a
busy machine: llama.cpp's worker threads spin at barriers, so wall-clock rates
of a 2-thread decode swing tenfold when other programs run. `compare` checks
that the texts are byte-identical and gives the median ratio of CPU times
(base / new; above 1 means the new code is cheaper). Used for refactors that
must not change behaviour (docs/benchmarks.md); it imports the module paths of
the engine from before its split into subpackages too.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def run(out: Path, threads: int = 1) -> None:
    from bench import speculative as b
    from engine.default_model import default_model_path

    try:
        from engine.backend.llama import LlamaModel
        from engine.decoding.decoder import Decoder
        from engine.decoding.prefix_cache import PrefixStateCache
        from engine.gguf.chat_template import ChatTemplate
        from engine.wire.control import LoadRequest
    except ImportError:  # a checkout from before engine/ was split into subpackages
        from engine.chat_template import ChatTemplate  # type: ignore[no-redef]
        from engine.decoder import Decoder  # type: ignore[no-redef]
        from engine.llama_backend import LlamaModel  # type: ignore[no-redef]
        from engine.prefix_cache import PrefixStateCache  # type: ignore[no-redef]

        from engine.wire import LoadRequest  # type: ignore[no-redef]

    # The same model settings as bench.speculative, but one thread.
    model = LlamaModel(
        LoadRequest(model=str(default_model_path()), n_ctx=4096, flash_attn="on", threads=threads)
    )
    template = ChatTemplate(model.meta("tokenizer.chat_template"))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    modes = {
        "plain": b.SpecParams(type="none"),
        "auto": b.SpecParams(type="auto"),
        "ngram-8": b.SpecParams(type="ngram", n_max=8, n_min=8),
    }
    record: dict[str, dict[str, Any]] = {}
    for name, (_kind, text) in b.PROMPTS.items():
        prompt = model.tokenize(
            template.render([{"role": "user", "content": text}]),
            add_special=False,
            parse_special=True,
        )
        for mode, spec in modes.items():
            cpu0 = time.process_time()
            r = b.run_once(decoder, prompt, spec, 256)
            cpu = time.process_time() - cpu0
            record[f"{name}/{mode}"] = {
                "text": r["text"],
                "tokens": r["tokens"],
                "draft_n": r["draft_n"],
                "accepted": r["draft_n_accepted"],
                "cpu_s": cpu,
                "wall_s": r["wall_s"],
            }
            print(f"{name}/{mode}: {r['tokens']} tokens, {cpu:.2f} s CPU", flush=True)
    out.write_text(json.dumps(record, indent=1))


def compare(paths: list[Path]) -> int:
    runs = [json.loads(p.read_text()) for p in paths]
    pairs = list(zip(runs[0::2], runs[1::2], strict=True))
    keys = list(pairs[0][0])
    identical = all(
        base[k]["text"] == new[k]["text"] and base[k]["tokens"] == new[k]["tokens"]
        for base, new in pairs
        for k in keys
    )
    print(f"{len(pairs)} pair(s), {len(keys)} cases; texts byte-identical: {identical}")
    print("| case | tokens | accepted/drafted, first pair (base; new) | CPU base/new (median) |")
    print("|---|---|---|---|")
    for k in keys:
        ratios = [base[k]["cpu_s"] / new[k]["cpu_s"] for base, new in pairs]
        b0, n0 = pairs[0][0][k], pairs[0][1][k]
        drafts = f"{b0['accepted']}/{b0['draft_n']}; {n0['accepted']}/{n0['draft_n']}"
        print(f"| {k} | {b0['tokens']} | {drafts} | {statistics.median(ratios):.3f} |")
    for mode in ("plain", "auto", "ngram-8"):
        ratios = [
            base[k]["cpu_s"] / new[k]["cpu_s"]
            for base, new in pairs
            for k in keys
            if k.endswith("/" + mode)
        ]
        print(f"{mode}: median CPU base/new {statistics.median(ratios):.3f}")
    return 0 if identical else 1


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "compare" and len(sys.argv) % 2 == 0:
        return compare([Path(p) for p in sys.argv[2:]])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
