"""The engine over real HTTP: the real process, the real model, OpenAI's own client."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.engine_proc import EngineProc, read_events, running_engine, serve_command, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProc]:
    with running_engine("--ctx", "2048", "--threads", "2", "--tool-self-test", "off") as proc:
        yield proc


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sse_events(response: httpx.Response) -> Iterator[tuple[float, Any]]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        yield time.perf_counter(), (payload if payload == "[DONE]" else json.loads(payload))


# --- start-up contract -----------------------------------------------------------------


def test_ready_event_is_the_last_stdout_line_and_follows_loading(engine: EngineProc) -> None:
    kinds = [e["event"] for e in engine.events]
    assert kinds[-1] == "ready"
    assert set(kinds[:-1]) <= {"loading"}
    assert engine.ready["host"] == "127.0.0.1"
    assert isinstance(engine.ready["port"], int) and engine.ready["port"] > 0
    assert len(engine.key) >= 32


def test_missing_model_gives_one_error_event_and_exit_1(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        serve_command("--model", str(tmp_path / "nope.gguf"), "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = read_events(proc, 60)
    assert proc.wait(30) == 1
    assert [e["event"] for e in events] == ["error"]
    assert "not found" in events[0]["message"]


def test_port_in_use_is_an_error_event() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.Popen(
            serve_command("--port", str(port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        events = read_events(proc, 60)
        assert proc.wait(30) == 1
    assert events[-1]["event"] == "error"
    assert str(port) in events[-1]["message"]


def test_non_loopback_bind_requires_an_explicit_key() -> None:
    proc = subprocess.Popen(
        serve_command("--host", "0.0.0.0", "--port", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = read_events(proc, 60)
    assert proc.wait(30) != 0
    assert events and events[-1]["event"] == "error"
    assert "api-key" in events[-1]["message"]


# --- generation ---------------------------------------------------------------------------


def test_stream_arrives_token_by_token(engine: EngineProc) -> None:
    body = {
        "messages": user("Count from one to twenty in words."),
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
    }
    with engine.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert events[-1][1] == "[DONE]"
    chunks = [e for _, e in events[:-1]]
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["timings"]["predicted_n"] == 32
    assert final["usage"]["completion_tokens"] == 32
    # One chunk per generated token (a few may merge where UTF-8 or stop matching holds text back).
    assert len(content) >= 28
    # They arrive spread over the generation, not in one burst at the end.
    times = [t for t, c in events[:-1] if c["choices"][0]["delta"].get("content")]
    assert times[-1] - times[0] > 0.5 * (final["timings"]["predicted_ms"] / 1000.0) * 0.5


def test_greedy_output_is_repeatable_and_max_tokens_holds(engine: EngineProc) -> None:
    fields = {"max_tokens": 40, "temperature": 0}
    a = engine.chat(user("Name three colours."), **fields)
    b = engine.chat(user("Name three colours."), **fields)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] <= 40
    if a["choices"][0]["finish_reason"] == "length":
        assert a["usage"]["completion_tokens"] == 40


def test_stop_sequence_ends_the_answer_before_it(engine: EngineProc) -> None:
    probe = engine.chat(
        user("Count from one to ten in words, separated by commas."), max_tokens=40, temperature=0
    )
    text = probe["choices"][0]["message"]["content"]
    assert len(text) > 10
    stop = text[6:9]
    stopped = engine.chat(
        user("Count from one to ten in words, separated by commas."),
        max_tokens=40,
        temperature=0,
        stop=[stop],
    )
    out = stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert out == text[: text.index(stop)]


def test_openai_client_lists_models_and_streams_a_chat(engine: EngineProc) -> None:
    client = openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.key)
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [engine.ready["model"]]
    assert client.models.retrieve(ids[0]).id == ids[0]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"
    stream = client.chat.completions.create(
        model=ids[0],
        messages=[{"role": "user", "content": "Say hello."}],
        stream=True,
        max_tokens=16,
        temperature=0,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces).strip()
    full = client.chat.completions.create(
        model=ids[0],
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
    )
    assert full.choices[0].message.content == "".join(pieces)
    assert full.usage is not None and full.usage.completion_tokens <= 16


def test_text_completions_route(engine: EngineProc) -> None:
    with engine.client() as c:
        r = c.post(
            "/v1/completions",
            json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"]
    assert (
        body["timings"]["prompt_n"] + body["timings"]["cache_n"] == body["usage"]["prompt_tokens"]
    )


def test_switching_back_to_a_chat_reuses_its_saved_state(engine: EngineProc) -> None:
    """Chat A runs 8 turns, chat B one, then A again: A re-reads at most 25% of its prompt."""
    chat_a: list[dict[str, str]] = [
        {"role": "system", "content": "You are a terse geography tutor."}
    ]
    for turn in range(8):
        chat_a.append(
            {
                "role": "user",
                "content": f"Question {turn + 1}: name a river in country number {turn + 1}.",
            }
        )
        answer = engine.chat(chat_a, max_tokens=24, temperature=0)
        chat_a.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    engine.chat(
        [
            {"role": "system", "content": "You write haiku about cats only."},
            {"role": "user", "content": "One haiku please about a cat sleeping in the sun."},
        ],
        max_tokens=24,
        temperature=0,
    )
    chat_a.append({"role": "user", "content": "Now summarise all the rivers you named."})
    back = engine.chat(chat_a, max_tokens=8, temperature=0)
    t = back["timings"]
    total_prompt = back["usage"]["prompt_tokens"]
    assert total_prompt > 300
    assert t["prompt_n"] <= 0.25 * total_prompt
    assert t["cache_n"] + t["prompt_n"] == total_prompt


def test_greedy_output_with_caches_equals_a_fresh_engine(engine: EngineProc) -> None:
    chat = [{"role": "user", "content": "Give me a word that rhymes with cat."}]
    first = engine.chat(chat, max_tokens=16, temperature=0)
    chat += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And one that rhymes with dog?"},
    ]
    cached = engine.chat(chat, max_tokens=24, temperature=0)
    assert cached["timings"]["cache_n"] > 0
    # Without the tool self-test, whose prompt would leave a few shared tokens in the cache.
    with running_engine("--ctx", "2048", "--threads", "2", "--tool-self-test", "off") as fresh:
        clean = fresh.chat(chat, max_tokens=24, temperature=0)
    assert clean["timings"]["cache_n"] == 0
    assert cached["choices"][0]["message"]["content"] == clean["choices"][0]["message"]["content"]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        ({"messages": "hello"}, 400, "invalid_value", "messages"),
        ({"messages": []}, 400, "invalid_value", "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "8"},
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3},
            400,
            "invalid_value",
            "max_completion_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "invalid_value",
            "temperature",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            400,
            "invalid_value",
            "stream",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "unsupported_value", "n"),
        (
            {"messages": [{"role": "user", "content": "x"}], "speculative": {"type": "telepathy"}},
            400,
            "invalid_value",
            "speculative",
        ),
    ],
)
def test_bad_requests_get_status_and_openai_error_shape(
    engine: EngineProc, body: Any, status: int, code: str, param: str | None
) -> None:
    with engine.client() as c:
        if isinstance(body, bytes):
            r = c.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        else:
            r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    if param:
        assert error["param"] == param
    # ...and the engine keeps serving.
    assert engine.chat(user("Hi"), max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_unknown_fields_are_ignored_and_flat_speculative_keys_accepted(engine: EngineProc) -> None:
    out = engine.chat(
        user("Hi"),
        max_tokens=4,
        temperature=0,
        frobnicate={"x": 1},
        logit_bias_extra=3,
        **{"speculative.n_max": 4, "speculative.type": "none"},
    )
    assert out["timings"]["draft_n"] == 0
    assert out["usage"]["completion_tokens"] >= 1


def test_prompt_too_long_and_max_tokens_clamped() -> None:
    with running_engine("--ctx", "128", "--threads", "2") as small:
        with small.client() as c:
            r = c.post(
                "/v1/chat/completions", json={"messages": user("word " * 400), "max_tokens": 4}
            )
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "messages"
            # Text completions name their own field; a prompt far too long to
            # tokenize is refused from its size, its count given as a lower bound.
            r = c.post("/v1/completions", json={"prompt": "word " * 200_000, "max_tokens": 4})
            assert r.status_code == 400
            error = r.json()["error"]
            assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
            assert "at least" in error["message"]
            r = c.post(
                "/v1/chat/completions",
                json={
                    # A prompt that leaves little room, so the clamped answer is short.
                    "messages": user("Continue this list: " + "apple, " * 100),
                    "max_tokens": 100000,
                    "temperature": 0,
                    "stop": [],
                    "speculative": {"type": "none"},
                },
            )
            n_ctx = c.get("/v1/engine/status").json()["settings"]["n_ctx"]
        assert r.status_code == 200
        body = r.json()
        assert 128 <= n_ctx <= 256  # llama.cpp pads the context to a multiple of 256
        assert body["usage"]["total_tokens"] <= n_ctx
        if body["choices"][0]["finish_reason"] == "length":
            assert body["usage"]["total_tokens"] >= n_ctx - 2


def test_foreign_host_and_bad_keys_are_refused(engine: EngineProc) -> None:
    url = engine.base_url
    with httpx.Client(timeout=30) as c:
        assert c.get(url + "/health").json() == {"status": "ok"}
        assert c.get(url + "/v1/models").status_code == 401
        assert (
            c.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )
        r = c.get(
            url + "/v1/models",
            headers={"Authorization": f"Bearer {engine.key}", "Host": "evil.example"},
        )
        assert 400 <= r.status_code < 500
        r = c.get(url + "/health", headers={"Host": "evil.example:80"})
        assert 400 <= r.status_code < 500
        r = c.get(
            url + "/v1/models",
            headers={
                "Authorization": f"Bearer {engine.key}",
                "Host": f"localhost:{engine.ready['port']}",
            },
        )
        assert r.status_code == 200


def test_loading_a_non_gguf_path_fails_in_status_and_keeps_serving(
    engine: EngineProc, tmp_path: Any
) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("this is a text file, not a model\n" * 50)
    with engine.client() as c:
        r = c.post("/v1/engine/load", json={"model": str(bogus), "n_ctx": 2048})
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        status = c.get("/v1/engine/status").json()
        while status["error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
            status = c.get("/v1/engine/status").json()
        assert status["error"]
        assert status["state"] == "ready"
        assert status["model"]["id"] == engine.ready["model"]
    assert engine.chat(user("Hi"), max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_dropped_client_frees_the_engine_at_once(engine: EngineProc) -> None:
    body = {
        "messages": user("Write a very long essay about rivers."),
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
        "speculative": {"type": "none"},
    }
    with engine.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    # 1500 tokens would take ~15 s here; a freed engine is ready again well before.
    with engine.client() as c:
        deadline = time.monotonic() + 5.0
        state = c.get("/v1/engine/status").json()["state"]
        while state != "ready" and time.monotonic() < deadline:
            time.sleep(0.02)
            state = c.get("/v1/engine/status").json()["state"]
    assert state == "ready"
    out = engine.chat(user("Hi"), max_tokens=3)
    assert out["usage"]["completion_tokens"] >= 1


def test_a_non_streaming_client_that_leaves_frees_the_engine_too(engine: EngineProc) -> None:
    body = json.dumps(
        {
            "messages": user("Write a very long essay about rivers."),
            "max_tokens": 1500,
            "temperature": 0,
            "speculative": {"type": "none"},
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {engine.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with engine.client() as c:
        sock = socket.create_connection((engine.ready["host"], engine.ready["port"]))
        sock.sendall(head + body)
        assert wait_for(lambda: c.get("/v1/engine/status").json()["state"] == "generating", 30)
        sock.close()  # gone before any answer: nobody will read the 1500 tokens
        # 1500 tokens take ~15 s here; a freed engine is ready again well before.
        assert wait_for(lambda: c.get("/v1/engine/status").json()["state"] == "ready", 5)


def test_repeat_last_n_minus_one_penalizes_the_whole_context(engine: EngineProc) -> None:
    def count(last_n: int) -> str:
        with engine.client() as c:
            r = c.post(
                "/v1/completions",
                json={
                    "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
                    "max_tokens": 30,
                    "temperature": 0,
                    "repeat_penalty": 1.5,
                    "repeat_last_n": last_n,
                    "speculative": {"type": "none"},
                },
            )
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    whole = count(-1)
    assert whole == count(2048)  # the whole context (llama-server's meaning of -1)
    assert whole != count(0)  # not "off", which is what llama.cpp makes of -1


def test_a_burst_of_64_concurrent_requests_is_queued_and_all_complete(engine: EngineProc) -> None:
    results: list[int | str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            # 64 wait their turn on 4 slots: a generous timeout for a busy CPU.
            with engine.client(timeout=600) as c:
                r = c.post(
                    "/v1/chat/completions",
                    json={"messages": user(f"Say {i}."), "max_tokens": 3, "stream": i % 2 == 0},
                )
                if r.status_code == 200 and i % 2 == 0:
                    assert "data: [DONE]" in r.text
                outcome: int | str = r.status_code
        except Exception as exc:  # recorded and asserted below
            outcome = repr(exc)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(660)
    assert not any(t.is_alive() for t in threads), "a request hung"
    # The default queue limit (64) holds the whole burst: no 503.
    assert results == [200] * 64, results
    with engine.client() as c:
        assert c.get("/v1/engine/status").json()["queue"]["waiting"] == 0


def test_speculative_draft_needs_a_draft_model_and_mtp_is_refused(engine: EngineProc) -> None:
    with engine.client() as c:
        for kind in ("draft", "mtp"):
            r = c.post(
                "/v1/chat/completions",
                json={"messages": user("Hi"), "max_tokens": 2, "speculative": {"type": kind}},
            )
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "speculative.type"


def test_draft_model_over_http_is_lossless(default_model: Any) -> None:
    """The built-in model drafts for itself: same greedy text, drafts accepted."""
    with running_engine(
        "--ctx", "1024", "--threads", "2", "--draft-model", str(default_model)
    ) as eng:
        with eng.client() as c:
            status = c.get("/v1/engine/status").json()
            assert status["settings"]["draft_model"] == str(default_model)
        ask = user("List five fruits, one per line.")
        plain = eng.chat(ask, max_tokens=40, temperature=0, speculative={"type": "none"})
        drafted = eng.chat(
            ask, max_tokens=40, temperature=0, speculative={"type": "draft", "n_min": 4, "n_max": 4}
        )
    assert drafted["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert drafted["timings"]["draft_n"] > 0
    assert drafted["timings"]["draft_n_accepted"] > 0
