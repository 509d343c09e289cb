"""Greedy answers must not depend on how they were computed.

The real engine over HTTP, an f16 KV cache with flash attention, past 512 cells
of context: the same prompt must give byte-identical text freshly, with
speculative verify batches, and from a cached prefix (only the tail
evaluated), for the built-in Q4_1 model and for Q4_0 and Q4_K_M copies of it
made here with llama_model_quantize: unlike Q4_1 they take llama.cpp's
repacked CPU kernels (Q4_0, Q4_K), its tinyBLAS products (Q4_0, Q5_0, Q8_0)
and its tiled K-quant product (Q4_K, Q6_K), which have separate few-row and
many-row paths. Q4_K_M runs in the engine's batch-invariant mode
(`--batch-invariant`). And alone or beside other requests, with a KV stream
per slot (`--no-kv-unified`). docs/architecture.md, "Exactness", says why this holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.engine_proc import EngineProc, running_engine

pytestmark = pytest.mark.slow

FTYPES = {"Q4_0": 2, "Q4_K_M": 15}  # llama_ftype values

CODE = """def total_price(items, discount=0.0):
    total = 0.0
    for item in items:
        if item.quantity <= 0:
            continue
        price = item.price * item.quantity
        if item.taxable:
            price *= 1.2
        total += price
    return total * (1.0 - discount)
"""
# About 600 prompt tokens: decoding reads past 512 cells, where llama.cpp
# switched single rows to a split-KV path.
SOURCE = "\n".join(CODE.replace("total_price", f"total_price_{i}") for i in range(7))
SYSTEM = "You copy code exactly."
PROMPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": f"Repeat this code exactly, then stop:\n\n{SOURCE}"},
]
PLAIN = {"type": "none"}
FORCED = {"type": "ngram", "n_max": 6, "n_min": 6}
MAX_TOKENS = 48


@pytest.fixture(scope="session")
def model_files(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in Q4_1 model and Q4_0 / Q4_K_M copies quantized from it."""
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    folder = tmp_path_factory.mktemp("quantized")
    files = {"Q4_1": default_model}
    for name, ftype in FTYPES.items():
        out = folder / f"smollm2-135m-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(default_model).encode(), str(out).encode(), params)
        assert rc == 0, f"quantizing to {name} failed ({rc})"
        files[name] = out
    return files


# Q4_1 and Q4_0 are exact with llama.cpp's defaults. Q4_K_M needs the engine's
# batch-invariant mode: its Q4_K/Q6_K products take a tiled kernel for 8 rows or
# more and vec_dot below, and its repacked Q4_K weights a gemv below 4 rows and a
# gemm above, with other roundings (docs/architecture.md, "Exactness").
CASES = {"Q4_1": [], "Q4_0": [], "Q4_K_M": ["--batch-invariant"]}


@pytest.fixture(scope="module", params=list(CASES))
def engine(request: pytest.FixtureRequest, model_files: dict[str, Path]) -> Iterator[EngineProc]:
    model = model_files[request.param]
    args = ["--model", str(model), "--ctx", "2048", "--flash-attn", "on", "--threads", "2"]
    args += ["--cache-type-k", "f16", "--cache-type-v", "f16", "--cache-ram", "0"]
    # One slot: `forget` then replaces the live context (with several, it would take
    # another slot and leave the long prompt cached); no tool self-test in that slot.
    args += ["--parallel", "1", "--tool-self-test", "off"]
    with running_engine(*args, *CASES[request.param]) as eng:
        yield eng


def ask(eng: EngineProc, messages: list[dict[str, str]], spec: dict[str, Any]) -> dict[str, Any]:
    client = openai.OpenAI(base_url=eng.base_url + "/v1", api_key=eng.key, max_retries=0)
    reply = client.chat.completions.create(
        model="default",
        messages=messages,  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        extra_body={"speculative": spec},
    )
    extra = reply.model_extra or {}
    return {"text": reply.choices[0].message.content or "", "timings": extra["timings"]}


def forget(eng: EngineProc) -> None:
    """Replaces the live context (the engine keeps no saved states: --cache-ram 0)."""
    ask(eng, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], PLAIN)


def test_greedy_text_is_the_same_fresh_speculative_and_from_a_cached_prefix(
    engine: EngineProc,
) -> None:
    forget(engine)
    fresh = ask(engine, PROMPT, PLAIN)
    t = fresh["timings"]
    assert t["cache_n"] < 10 and t["prompt_n"] > 520, t
    assert len(fresh["text"]) > 40  # a real answer, not an early stop

    forget(engine)
    drafted = ask(engine, PROMPT, FORCED)
    assert drafted["timings"]["cache_n"] < 10
    assert drafted["timings"]["draft_n"] > 0  # verify batches really ran
    assert drafted["text"] == fresh["text"]

    # The next turn: the context holds the first prompt and its answer, so only
    # the new tail is evaluated; a fresh context evaluates all of it at once.
    turn = [
        *PROMPT,
        {"role": "assistant", "content": fresh["text"]},
        {"role": "user", "content": "Now repeat the first function again."},
    ]
    cached = ask(engine, turn, PLAIN)
    assert cached["timings"]["cache_n"] > 520, cached["timings"]
    forget(engine)
    recomputed = ask(engine, turn, PLAIN)
    assert recomputed["timings"]["cache_n"] < 10
    assert cached["text"] == recomputed["text"]


# Two other requests, long enough to share the steps of PROMPT's prefill and answer.
OTHERS = [
    [{"role": "user", "content": f"Explain what this code does:\n\n{SOURCE}"}],
    [{"role": "user", "content": f"List every function name in:\n\n{SOURCE}"}],
]


def test_greedy_text_is_the_same_alone_and_among_other_requests(
    engine: EngineProc, model_files: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    forget(engine)
    alone = ask(engine, PROMPT, PLAIN)
    assert alone["timings"]["cache_n"] < 10
    name = request.node.callspec.params["engine"]
    # Three slots, each with a KV stream of its own (docs/architecture.md, "Exactness").
    args = ["--model", str(model_files[name]), "--ctx", "3072", "--flash-attn", "on"]
    args += ["--threads", "2", "--cache-type-k", "f16", "--cache-type-v", "f16"]
    args += ["--parallel", "3", "--no-kv-unified", "--tool-self-test", "off"]
    with running_engine(*args, *CASES[name]) as shared:
        replies: dict[int, dict[str, Any]] = {}
        spans: dict[int, tuple[float, float]] = {}

        def run(i: int, messages: list[dict[str, str]]) -> None:
            start = time.monotonic()
            replies[i] = ask(shared, messages, PLAIN)
            spans[i] = (start, time.monotonic())

        threads = [
            threading.Thread(target=run, args=(i, m)) for i, m in enumerate([PROMPT, *OTHERS])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    assert replies[0]["timings"]["prompt_n"] > 520  # evaluated there, among the others
    # The three were in flight together (each started before any ended).
    assert max(s for s, _e in spans.values()) < min(e for _s, e in spans.values())
    assert replies[0]["text"] == alone["text"]
