"""Parallel slots in the real engine over HTTP, read by the official openai client.

With a KV stream per slot (--no-kv-unified), a stream decoded beside seven
others must give exactly the text it gives alone (docs/architecture.md,
"Exactness").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.engine_proc import EngineProc, running_engine, wait_for

# q8_0 KV takes the per-row attention path; --batch-invariant keeps the matrix products
# the same for one row and for eight (no repacked gemv/gemm split, no tiled product).
EXACT = (
    "--cache-type-k",
    "q8_0",
    "--cache-type-v",
    "q8_0",
    "--flash-attn",
    "on",
    "--batch-invariant",
)
TOPICS = ["rivers", "owls", "copper", "tea", "glaciers", "bees", "violins", "deserts"]


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProc]:
    with running_engine("--ctx", "4096", "--threads", "2", "--parallel", "8", *EXACT) as proc:
        yield proc


def client(engine: EngineProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.key, max_retries=0)


def ask(engine: EngineProc, topic: str, log: list[tuple[str, str, float]] | None = None) -> str:
    stream = client(engine).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
        # Long enough that the last stream's first token comes before the first
        # stream's end even when the client's threads start late on a busy machine.
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if log is not None and not pieces:
                log.append(("first", topic, time.monotonic()))
            pieces.append(chunk.choices[0].delta.content)
    if log is not None:
        log.append(("done", topic, time.monotonic()))
    return "".join(pieces)


def concurrently(engine: EngineProc) -> tuple[dict[str, str], list[tuple[str, str, float]]]:
    answers: dict[str, str] = {}
    log: list[tuple[str, str, float]] = []
    threads = [
        threading.Thread(target=lambda t=topic: answers.__setitem__(t, ask(engine, t, log)))
        for topic in TOPICS
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers, log


def test_eight_concurrent_streams_are_answered_interleaved(engine: EngineProc) -> None:
    answers, log = concurrently(engine)
    assert set(answers) == set(TOPICS) and all(answers.values())
    # Interleaved, not one after another: every stream had started before any ended.
    last_start = max(at for kind, _t, at in log if kind == "first")
    first_end = min(at for kind, _t, at in log if kind == "done")
    assert last_start < first_end


def test_eight_concurrent_greedy_streams_each_give_their_solo_answer() -> None:
    # Exact among concurrent requests takes a KV stream per slot (--no-kv-unified):
    # in the unified cache a sequence's cells interleave with the others', so the
    # attention sums them in another grouping (docs/architecture.md, "Exactness").
    # An f16 cache: the batch-invariant attention makes its rounding row-independent.
    args = ("--ctx", "4096", "--threads", "2", "--parallel", "8", "--no-kv-unified")
    args += ("--cache-type-k", "f16", "--cache-type-v", "f16", "--flash-attn", "on")
    with running_engine(*args, "--tool-self-test", "off") as exact:
        solo = {topic: ask(exact, topic) for topic in TOPICS}
        answers, log = concurrently(exact)
    assert answers == solo
    # ... and they really shared steps: every stream started before the first ended.
    first_done = min(t for kind, _topic, t in log if kind == "done")
    assert all(t < first_done for kind, _topic, t in log if kind == "first")


def test_a_dropped_stream_frees_its_slot(engine: EngineProc) -> None:
    stream = client(engine).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count from one to five hundred in words."}],
        max_tokens=2000,
        temperature=0,
        stream=True,
    )
    for n, _chunk in enumerate(stream):
        if n == 3:
            break
    with engine.client() as http:
        busy = [s for s in http.get("/v1/engine/status").json()["slots"] if s["state"] != "idle"]
        assert len(busy) == 1 and busy[0]["n_generated"] >= 1 and busy[0]["age_s"] > 0
        stream.close()  # the client goes away
        assert wait_for(
            lambda: all(
                s["state"] == "idle" for s in http.get("/v1/engine/status").json()["slots"]
            ),
            30,
        )
        status = http.get("/v1/engine/status").json()
    assert len(status["slots"]) == 8 and status["settings"]["n_parallel"] == 8
    assert status["settings"]["kv_unified"] is True


def test_a_short_request_is_answered_while_a_long_prompt_is_still_prefilled(
    engine: EngineProc,
) -> None:
    # About 1,000 tokens: several ~250 ms chunks even on a fast CPU.
    filler = " ".join(f"Line {i}: the {TOPICS[i % 8]} note number {i}." for i in range(80))
    order: list[str] = []

    def first_token(name: str, content: str) -> None:
        stream = client(engine).chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": content}],
            max_tokens=2,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                order.append(name)
                break
        stream.close()

    long = threading.Thread(target=first_token, args=("long", f"{filler}\nSummarize."))
    long.start()
    with engine.client() as http:
        assert wait_for(
            lambda: any(
                s["state"] == "prefill" for s in http.get("/v1/engine/status").json()["slots"]
            ),
            60,
            interval=0.01,
        )
    first_token("short", "Say hello.")
    long.join(600)  # a busy CPU makes the rest of the long prefill slow, not wrong
    assert not long.is_alive()
    # The long prompt goes in chunks of about 250 ms once another stream
    # shares the steps: the short one's answer starts before it is done.
    assert order == ["short", "long"]


def test_a_full_shared_cache_parks_the_newest_request_until_the_other_finishes() -> None:
    filler = " ".join(f"Item {i} is on shelf {i % 7}." for i in range(12))
    with running_engine("--ctx", "256", "--threads", "2", "--parallel", "2", *EXACT) as small:
        first_token = threading.Event()
        outcome: dict[str, object] = {}

        def older() -> None:
            stream = client(small).chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": f"{filler} List every item."}],
                temperature=0,
                stream=True,
            )
            text = []
            for chunk in stream:
                first_token.set()
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    outcome["finish"] = chunk.choices[0].finish_reason or outcome.get("finish")
            outcome["text"] = "".join(text)

        states: set[str] = set()
        watching = threading.Event()

        def watch() -> None:
            with small.client() as http:
                while not watching.is_set():
                    body = http.get("/v1/engine/status").json()
                    states.update(s["state"] for s in body.get("slots", []))
                    time.sleep(0.02)

        thread = threading.Thread(target=older)
        watcher = threading.Thread(target=watch)
        thread.start()
        watcher.start()
        assert first_token.wait(60)
        question = [{"role": "user", "content": f"{filler} Repeat the list."}]
        younger = client(small).chat.completions.create(
            model="default", messages=question, max_tokens=120, temperature=0
        )
        thread.join(600)  # before the engine stops, which would cancel it
        watching.set()
        watcher.join(30)
        assert not thread.is_alive()
        # Asked again alone, the question gets the same answer: the parked
        # request resumed from exactly the cells it had saved.
        alone = client(small).chat.completions.create(
            model="default", messages=question, max_tokens=120, temperature=0
        )
    # The younger request waited in host RAM while the cache was full ...
    assert "parked" in states
    # ... and was answered in full, not refused; the older one ran to its end.
    assert younger.choices[0].finish_reason in ("stop", "length")
    assert younger.choices[0].message.content
    assert younger.choices[0].message.content == alone.choices[0].message.content
    assert outcome.get("finish") in ("length", "stop") and outcome.get("text")
