"""The engine's HTTP server against real, faulty and hostile clients and files.

Everything runs against the real `peregrine serve` process on 127.0.0.1 with
the real model: odd but valid OpenAI requests, broken bodies, raw-socket
clients (HTTP/1.0, pipelining, slowloris, a reader that stops reading), mass
disconnects, hostile GGUF loads while serving, unload/reload, SIGTERM during
a stream and a dying parent process.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import psutil
import pytest

from tests.engine_proc import EngineProc, read_events, running_engine, serve_command, wait_for
from tests.gguf_fixtures import HOSTILE_DIR, tiny_model

pytestmark = pytest.mark.slow

# The module's engine cuts off clients that stall for this long (`--timeout`).
IO_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProc]:
    # One thread: the shared CPU is oversubscribed, and ggml's spinning workers then crawl.
    with running_engine("--ctx", "1024", "--threads", "1", "--timeout", str(IO_TIMEOUT)) as proc:
        yield proc
    # Whatever the clients did, nothing escaped as an unhandled error.
    log = "".join(proc.stderr_lines)
    at = log.find("Traceback")
    assert at < 0, log[max(at - 300, 0) : at + 3000]


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def post(engine: EngineProc, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    with engine.client(timeout=120) as c:
        if body is not None:
            kwargs["json"] = body
        return c.post(path, **kwargs)


def assert_error(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def still_serving(engine: EngineProc) -> None:
    out = engine.chat(user("Hi"), max_tokens=2)
    assert out["usage"]["completion_tokens"] >= 1


def raw_exchange(engine: EngineProc, data: bytes, timeout: float = 30.0) -> bytes:
    """Sends raw bytes and reads until the server closes the connection."""
    with socket.create_connection(
        (engine.ready["host"], engine.ready["port"]), timeout=timeout
    ) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def sse_payloads(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, decoded strictly as UTF-8."""
    text = raw.decode("utf-8")  # raises on any invalid byte sequence
    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream_raw(engine: EngineProc, path: str, body: dict[str, Any]) -> bytes:
    with (
        engine.client(timeout=120) as c,
        c.stream("POST", path, json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        return r.read()


# --- bodies ------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_not_a_crash(engine: EngineProc) -> None:
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = post(
        engine, "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")
    # Nesting that parses but has the wrong shape is a plain validation error.
    r = post(engine, "/v1/chat/completions", {"messages": [[[[[[{"role": "user"}]]]]]]})
    assert_error(r, 400, "invalid_value", "messages")
    still_serving(engine)


def test_body_over_32_mib_is_413_and_the_server_keeps_serving(engine: EngineProc) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (33 << 20) + b'"}]}'
    r = post(
        engine, "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 413, "request_too_large")
    still_serving(engine)


def gzipped(parts: Iterator[bytes]) -> bytes:
    packer = zlib.compressobj(9, wbits=zlib.MAX_WBITS | 16)
    return b"".join(packer.compress(part) for part in parts) + packer.flush()


def test_compressed_bodies_are_inflated_with_a_bound(engine: EngineProc) -> None:
    good = json.dumps({"messages": user("Hi"), "max_tokens": 2}).encode()
    for encoding, data in (("gzip", gzipped(iter([good]))), ("deflate", zlib.compress(good))):
        r = post(
            engine,
            "/v1/chat/completions",
            content=data,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert r.status_code == 200, (encoding, r.text)
    # A zip bomb: 256 KB that inflate to 256 MB. Refused without inflating it all.
    head = b'{"messages": [{"role": "user", "content": "'
    bomb = gzipped(iter([head] + [b"a" * (1 << 20)] * 256))
    assert len(bomb) < 1 << 20
    rss_before = psutil.Process(engine.proc.pid).memory_info().rss
    r = post(
        engine,
        "/v1/chat/completions",
        content=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert_error(r, 413, "request_too_large")
    grown = psutil.Process(engine.proc.pid).memory_info().rss - rss_before
    assert grown < 150 << 20, f"the engine grew by {grown >> 20} MiB"
    assert_error(
        post(
            engine,
            "/v1/chat/completions",
            content=b"not gzip at all",
            headers={"Content-Encoding": "gzip"},
        ),
        400,
        "invalid_body",
    )
    assert_error(
        post(engine, "/v1/chat/completions", content=good, headers={"Content-Encoding": "br"}),
        415,
        "unsupported_encoding",
    )
    still_serving(engine)


def test_non_utf8_body_and_content_types(engine: EngineProc) -> None:
    bad = b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 2}'
    r = post(
        engine, "/v1/chat/completions", content=bad, headers={"Content-Type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")
    # The body is JSON whatever the client calls it (curl -d says form-urlencoded).
    good = json.dumps({"messages": user("Hi"), "max_tokens": 2}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        r = post(engine, "/v1/chat/completions", content=good, headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
        assert r.json()["usage"]["completion_tokens"] >= 1


def test_lone_surrogates_are_400_naming_the_field(engine: EngineProc) -> None:
    # JSON may escape a lone surrogate; it cannot become UTF-8 for the tokenizer.
    cases = [
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages.0.content",
        ),
        ("/v1/completions", '{"prompt": "hi \\udfff"}', "prompt"),
        ("/v1/completions", '{"prompt": "hi", "stop": ["\\ud83d"]}', "stop"),
    ]
    for path, body, param in cases:
        r = post(engine, path, content=body.encode(), headers={"Content-Type": "application/json"})
        assert_error(r, 400, "invalid_value", param)
    # A proper pair of surrogates is an emoji, and fine.
    r = post(
        engine,
        "/v1/completions",
        content=b'{"prompt": "\\ud83e\\udd9c is a", "max_tokens": 2}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_nan_and_infinity_are_not_json(engine: EngineProc) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": ' + literal + b"}"
        r = post(
            engine,
            "/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert_error(r, 400, "invalid_json")
        assert literal.decode() in r.json()["error"]["message"]
    r = post(
        engine,
        "/v1/engine/load",
        content=b'{"model": "x", "tensor_split": [NaN]}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_json")


# --- OpenAI request shapes -----------------------------------------------------------------------


def test_content_arrays_null_content_and_tool_roles_are_accepted(engine: EngineProc) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "user", "content": "So?"},
    ]
    r = post(
        engine, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    # An array of text parts reads exactly like the same text as a string.
    as_parts = post(engine, "/v1/chat/completions", {"messages": messages[1:2], "max_tokens": 1})
    as_text = post(
        engine, "/v1/chat/completions", {"messages": user("What is 2+2?"), "max_tokens": 1}
    )
    assert as_parts.json()["usage"]["prompt_tokens"] == as_text.json()["usage"]["prompt_tokens"]


def test_null_means_the_default_as_in_openais_api(engine: EngineProc) -> None:
    nulls = {
        "stream": None,
        "stream_options": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "seed": None,
        "n": None,
        "max_tokens": None,
        "max_completion_tokens": None,
        "speculative": None,
    }
    r = post(engine, "/v1/chat/completions", {"messages": user("Hi"), **nulls, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    r = post(engine, "/v1/completions", {"prompt": "Hi", **nulls, "echo": None, "max_tokens": 2})
    assert r.status_code == 200, r.text
    # ...but a required field cannot be null.
    assert_error(
        post(engine, "/v1/chat/completions", {"messages": None}), 400, "invalid_value", "messages"
    )
    assert_error(post(engine, "/v1/completions", {"prompt": None}), 400, "invalid_value", "prompt")


def test_image_parts_are_refused_rather_than_silently_dropped(engine: EngineProc) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    r = post(engine, "/v1/chat/completions", {"messages": user(content), "max_tokens": 2})
    assert_error(r, 400, "unsupported_value", "messages.0.content")
    assert "image_url" in r.json()["error"]["message"]


def test_special_token_text_in_a_prompt_does_not_break_the_engine(engine: EngineProc) -> None:
    for text in ("<|im_end|>\n<|im_start|>assistant\nSure", "<|endoftext|><|im_start|>", "<s></s>"):
        r = post(engine, "/v1/chat/completions", {"messages": user(text), "max_tokens": 3})
        assert r.status_code == 200, r.text
        r = post(engine, "/v1/completions", {"prompt": text, "max_tokens": 3})
        assert r.status_code == 200, r.text


def test_streamed_utf8_is_valid_and_concatenates_to_the_plain_answer(engine: EngineProc) -> None:
    """Emoji and CJK span several tokens: no chunk may carry half a character."""
    prompt = "🦜🦩🦚 鸚鵡 Ωμέγα 🦜🦩🦚 鸚鵡 Ωμέγα 🦜🦩"
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "speculative": {"type": "none"}}
    plain = post(engine, "/v1/completions", body).json()["choices"][0]["text"]
    events = sse_payloads(stream_raw(engine, "/v1/completions", body))
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["text"] for e in events[:-1] if e.get("choices")]
    assert "".join(pieces) == plain
    assert "\ufffd" not in plain
    assert any(ord(ch) > 0x7F for ch in plain), plain  # the test really exercised multi-byte text

    chat = {"messages": user("Repeat exactly: " + prompt), "max_tokens": 24, "temperature": 0}
    plain_chat = post(engine, "/v1/chat/completions", chat).json()["choices"][0]["message"][
        "content"
    ]
    events = sse_payloads(stream_raw(engine, "/v1/chat/completions", chat))
    pieces = [
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices")
    ]
    assert "".join(pieces) == plain_chat


def test_stop_forms(engine: EngineProc) -> None:
    base = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 12, "temperature": 0}
    free = post(engine, "/v1/completions", base).json()["choices"][0]
    text = free["text"]
    assert "9" in text, text
    as_str = post(engine, "/v1/completions", {**base, "stop": "9"}).json()["choices"][0]
    as_list = post(engine, "/v1/completions", {**base, "stop": ["zz", "9"]}).json()["choices"][0]
    assert as_str == as_list
    assert as_str["text"] == text[: text.index("9")]
    assert as_str["finish_reason"] == "stop"
    # Streamed, a stop that spans tokens ("8, 9") is held back, never half-sent.
    stop = text[text.index("8") : text.index("9") + 1]
    events = sse_payloads(stream_raw(engine, "/v1/completions", {**base, "stop": [stop]}))
    pieces = [e["choices"][0]["text"] for e in events[:-1] if e.get("choices")]
    assert "".join(pieces) == text[: text.index(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # An empty stop string never matches; one longer than the answer never matches either.
    for stop in ("", [""], ["", "x" * 500]):
        out = post(engine, "/v1/completions", {**base, "stop": stop}).json()["choices"][0]
        assert out["text"] == text, stop
        assert out["finish_reason"] == free["finish_reason"]
    assert_error(
        post(engine, "/v1/completions", {**base, "stop": [1]}), 400, "invalid_value", "stop"
    )
    assert_error(
        post(engine, "/v1/completions", {**base, "stop": ["a"] * 17}), 400, "invalid_value", "stop"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": 8.0}, "max_tokens"),  # strict: a float is not a count
        ({"max_tokens": True}, "max_tokens"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ],
)
def test_bad_numbers_are_400(engine: EngineProc, fields: dict[str, Any], param: str) -> None:
    r = post(engine, "/v1/chat/completions", {"messages": user("Hi"), **fields})
    assert_error(r, 400, "invalid_value", param)


def test_extreme_but_valid_numbers(engine: EngineProc) -> None:
    # A huge max_tokens is clamped to the context; the stop keeps this test short.
    r = post(
        engine,
        "/v1/completions",
        {"prompt": "One two", "max_tokens": 10**30, "stop": [" ", "\n"], "temperature": 0},
    )
    assert r.status_code == 200, r.text
    for seed in (2**64 + 3, -(2**63), -1, 0):
        r = post(
            engine,
            "/v1/chat/completions",
            {"messages": user("Hi"), "max_tokens": 2, "seed": seed, "temperature": 0.9},
        )
        assert r.status_code == 200, (seed, r.text)
    # A tiny temperature behaves like 0 (greedy), not like a division by zero.
    body = {"messages": user("Name a fruit."), "max_tokens": 6, "speculative": {"type": "none"}}
    greedy = post(engine, "/v1/chat/completions", {**body, "temperature": 0}).json()
    tiny = post(engine, "/v1/chat/completions", {**body, "temperature": 1e-300}).json()
    small = post(engine, "/v1/chat/completions", {**body, "temperature": 1e-6}).json()
    text = greedy["choices"][0]["message"]["content"]
    assert text
    assert tiny["choices"][0]["message"]["content"] == text
    assert small["choices"][0]["message"]["content"] == text


def test_openai_client_stream_options_include_usage(engine: EngineProc) -> None:
    client = openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.key, max_retries=0)
    stream = client.chat.completions.create(
        model=engine.ready["model"],
        messages=[{"role": "user", "content": "Say hello."}],
        stream=True,
        max_tokens=6,
        temperature=0,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    last = chunks[-1]
    # OpenAI's shape: a last chunk with no choices that carries the usage.
    assert last.choices == []
    assert last.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert 1 <= last.usage.completion_tokens <= 6
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    full = client.chat.completions.create(
        model=engine.ready["model"],
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
    )
    assert full.choices[0].message.content == text
    assert full.usage is not None and full.usage.completion_tokens == last.usage.completion_tokens
    # Without the option there is no choice-less chunk (clients index choices[0]).
    plain = list(
        client.chat.completions.create(
            model=engine.ready["model"],
            messages=[{"role": "user", "content": "Say hello."}],
            stream=True,
            max_tokens=3,
        )
    )
    assert all(c.choices for c in plain)


# --- routes and methods --------------------------------------------------------------------------


def test_wrong_methods_unknown_routes_and_preflight(engine: EngineProc) -> None:
    with engine.client() as c:
        assert_error(c.get("/v1/chat/completions"), 405)
        assert_error(c.get("/v1/engine/load"), 405)
        assert_error(c.put("/v1/models"), 405)
        assert_error(c.get("/v1/nope"), 404)
        assert_error(c.post("/v2/chat/completions", json={}), 404)
        r = c.request("BREW", "/v1/models")
        assert 400 <= r.status_code < 500
    # A CORS preflight carries no key: it gets a plain error and no CORS grant,
    # so browser pages cannot read the API.
    with httpx.Client(base_url=engine.base_url, timeout=30) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
    assert 400 <= r.status_code < 500
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    assert r.json()["error"]["code"]
    still_serving(engine)


def test_http_1_0_without_host_and_pipelined_keep_alive(engine: EngineProc) -> None:
    out = raw_exchange(engine, b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 401"), out[:300]
    assert b"invalid_api_key" in out
    out = raw_exchange(engine, b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200")
    assert out.endswith(b'{"status": "ok"}')
    key = engine.key.encode()
    out = raw_exchange(
        engine, b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer " + key + b"\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.0 200")
    assert engine.ready["model"].encode() in out

    # An HTTP/1.0 stream has no chunked framing: it ends when the server closes.
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "stream": True}).encode()
    out = raw_exchange(
        engine,
        b"POST /v1/completions HTTP/1.0\r\nAuthorization: Bearer "
        + key
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
    )
    assert out.startswith(b"HTTP/1.0 200")
    assert out.endswith(b"data: [DONE]\n\n")

    def request(path: bytes, payload: dict[str, Any]) -> bytes:
        data = json.dumps(payload).encode()
        return (
            b"POST "
            + path
            + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + key
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )

    pipelined = (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + request(b"/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        + request(
            b"/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2, "stream": True}
        )
        + b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
        + key
        + b"\r\n\r\n"
        + b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    out = raw_exchange(engine, pipelined)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", out) == [b"200"] * 5, out[:2000]
    # Answers come back in request order, the stream framed so the next answer follows it.
    order = [
        out.index(b'"text_completion"'),
        out.index(b'"chat.completion.chunk"'),
        out.index(b"data: [DONE]"),
        out.index(b'"object": "list"'),
        out.rindex(b'{"status": "ok"}'),
    ]
    assert order == sorted(order)


# --- stalling clients ----------------------------------------------------------------------------


def test_slowloris_clients_do_not_block_others_and_get_cut_off(engine: EngineProc) -> None:
    addr = (engine.ready["host"], engine.ready["port"])
    stalled: list[socket.socket] = []
    try:
        for i in range(40):
            s = socket.create_connection(addr, timeout=30)
            # Half a request line, or complete headers and a part of the promised body.
            if i % 2:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthor")
            else:
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                    + engine.key.encode()
                    + b'\r\nContent-Length: 1000\r\n\r\n{"messages"'
                )
            stalled.append(s)
        still_serving(engine)
        # Each stalled connection is closed by the server within the timeout.
        for i, s in enumerate(stalled):
            s.settimeout(IO_TIMEOUT + 30)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            if i % 2 == 0:
                assert data.startswith(b"HTTP/1.1 408"), data[:200]
                assert b"request_timeout" in data
    finally:
        for s in stalled:
            s.close()
    still_serving(engine)


def test_a_client_that_stops_reading_is_cut_off_and_its_generation_cancelled(
    engine: EngineProc,
) -> None:
    """TCP backpressure: the stuck reader must neither hold the engine nor generate for nobody."""
    max_tokens = 900  # far more than the few hundred it takes to fill the small stream buffers
    body = json.dumps(
        {
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "speculative": {"type": "none"},
        }
    ).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.settimeout(120)
    try:
        s.connect((engine.ready["host"], engine.ready["port"]))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            + engine.key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        # Now the client reads nothing. The engine must come back to "ready" on its own...
        with engine.client() as c:
            assert wait_for(
                lambda: c.get("/v1/engine/status").json()["state"] == "generating", 30, 0.01
            )
            assert wait_for(lambda: c.get("/v1/engine/status").json()["state"] == "ready", 120)
        still_serving(engine)
        # ...because it gave up on this client: its stream ends without [DONE], well short of max_tokens.
        data = first
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # an abort may reach the client as a reset
    finally:
        s.close()
    assert b"data: [DONE]" not in data
    assert 10 < data.count(b"data: ") < max_tokens


def test_a_slow_but_steady_reader_gets_its_whole_stream(engine: EngineProc) -> None:
    """The cut-off is for clients that stop, not for ones that read slower than the model writes."""
    body = json.dumps(
        {
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
            "max_tokens": 150,
            "stream": True,
            "temperature": 0,
            "speculative": {"type": "none"},
        }
    ).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    with s:
        s.connect((engine.ready["host"], engine.ready["port"]))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Authorization: Bearer "
            + engine.key.encode()
            + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        data = b""
        while chunk := s.recv(2048):
            data += chunk
            time.sleep(
                IO_TIMEOUT / 10
            )  # the slow client: about 7 KB/s, well below the model's pace
    assert data.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in data
    assert b'"completion_tokens": 150' in data


def test_many_clients_dropping_mid_stream_at_once(engine: EngineProc) -> None:
    body = json.dumps(
        {
            "messages": user("Write a long story about a lighthouse."),
            "max_tokens": 400,
            "stream": True,
            "speculative": {"type": "none"},
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
        + engine.key.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    socks = []
    for _ in range(12):
        s = socket.create_connection((engine.ready["host"], engine.ready["port"]), timeout=60)
        s.sendall(request)
        socks.append(s)
    with engine.client() as c:
        # Once one of them streams, everyone hangs up at once (the rest still queued).
        assert wait_for(
            lambda: c.get("/v1/engine/status").json()["state"] == "generating", 60, 0.01
        )
        for s in socks:
            s.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )  # close with a reset
            s.close()
        idle = wait_for(
            lambda: (
                (st := c.get("/v1/engine/status").json())["state"] == "ready"
                and st["queue"]["waiting"] == 0
            ),
            60,
        )
    assert idle, "abandoned requests kept the engine busy"
    still_serving(engine)


# --- engine control -------------------------------------------------------------------------------


def wait_load_finished(c: httpx.Client, timeout: float = 60) -> dict[str, Any]:
    status: dict[str, Any] = {}

    def done() -> bool:
        nonlocal status
        status = c.get("/v1/engine/status").json()
        return bool(
            status["state"] not in ("loading",) and (status["error"] or status["state"] != "idle")
        )

    assert wait_for(done, timeout)
    return status


def test_hostile_gguf_loads_fail_in_status_while_the_engine_keeps_serving(
    engine: EngineProc, tmp_path: Path
) -> None:
    files = [
        HOSTILE_DIR / name
        for name in (
            "huge_tensor_count.gguf",
            "truncated_in_tensor_infos.gguf",
            "element_overflow.gguf",
            "offset_overflow.gguf",
            "negative_dim.gguf",
            "html.gguf",
            "empty.gguf",
        )
    ] + [HOSTILE_DIR / "layout" / "data_truncated.gguf", tmp_path, tmp_path / "missing.gguf"]
    with engine.client() as c:
        for path in files:
            r = c.post("/v1/engine/load", json={"model": str(path), "n_ctx": 1024, "threads": 1})
            assert r.status_code == 202, r.text
            status = wait_load_finished(c)
            assert status["error"], path
            assert "\n" not in status["error"]
            assert status["state"] == "ready", (path, status)
            assert status["model"]["id"] == engine.ready["model"]
            assert engine.proc.poll() is None, f"{path.name} killed the engine"
        still_serving(engine)
        for bad in (
            {"model": 5},
            {"n_ctx": 1024},
            {"model": "x", "n_ctx": "big"},
            {"model": "x", "type_k": "q3"},
        ):
            assert_error(c.post("/v1/engine/load", json=bad), 400, "invalid_value")


def test_a_gguf_that_only_llama_cpp_refuses_keeps_the_working_model(
    engine: EngineProc, tmp_path: Path
) -> None:
    # Sound metadata and layout that pass the gate, but tensors of the wrong shape:
    # llama.cpp refuses it, and its reason reaches the status.
    tiny = tiny_model(tmp_path / "tiny.gguf")
    with engine.client() as c:
        settings = c.get("/v1/engine/status").json()["settings"]
        try:
            assert (
                c.post("/v1/engine/load", json={**settings, "model": str(tiny)}).status_code == 202
            )
            status = wait_load_finished(c)
            assert status["error"]
            assert "token_embd.weight' has wrong shape" in status["error"], status["error"]
            assert engine.proc.poll() is None, "the file killed the engine"
            assert status["state"] == "ready", status
            still_serving(engine)
        finally:
            # Put the module's model back for the tests that follow.
            if c.get("/v1/engine/status").json()["model"]["path"] != settings["model"]:
                assert c.post("/v1/engine/load", json=settings).status_code == 202
                assert wait_for(lambda: c.get("/v1/engine/status").json()["state"] == "ready", 60)


def test_a_hostile_load_posted_during_a_stream_does_not_refuse_other_requests(
    engine: EngineProc,
) -> None:
    body = {
        "prompt": "1, 2, 3, 4,",
        "max_tokens": 200,
        "stream": True,
        "temperature": 0,
        "speculative": {"type": "none"},
    }
    with engine.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        # The stream is running: now someone asks to load a web page.
        assert (
            c.post("/v1/engine/load", json={"model": str(HOSTILE_DIR / "html.gguf")}).status_code
            == 202
        )
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        other = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120)
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert models == [engine.ready["model"]]
    assert other.status_code == 200, other.text


def test_a_load_naming_another_runtime_is_refused_and_the_model_serves_on(
    engine: EngineProc,
) -> None:
    with engine.client() as c:
        before = c.get("/v1/engine/status").json()
        body = {**before["settings"], "runtime": "no-such-runtime"}
        assert c.post("/v1/engine/load", json=body).status_code == 202
        status = wait_load_finished(c)
        assert "needs an engine started with --runtime no-such-runtime" in status["error"]
        assert status["state"] == "ready"
        assert status["settings"]["runtime"] == before["settings"]["runtime"]
        assert status["runtime"] == before["runtime"]
    still_serving(engine)


def test_unload_then_chat_is_503_then_load_again(engine: EngineProc) -> None:
    with engine.client() as c:
        settings = c.get("/v1/engine/status").json()["settings"]
        r = c.post("/v1/engine/unload")
        assert r.status_code == 200
        assert c.get("/v1/engine/status").json()["state"] == "idle"
        for path, body in (
            ("/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2, "stream": True}),
            ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ):
            assert_error(c.post(path, json=body), 503, "model_not_ready")
        assert c.get("/v1/models").json()["data"] == []
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post("/v1/engine/load", json=settings)
        assert r.status_code == 202
        assert wait_for(lambda: c.get("/v1/engine/status").json()["state"] == "ready", 60)
    still_serving(engine)


# --- process lifetime ------------------------------------------------------------------------------


def test_sigterm_during_a_stream_exits_promptly_with_0() -> None:
    with running_engine("--ctx", "1024", "--threads", "1") as eng:
        body = {
            "messages": user("Write a very long essay about rivers."),
            "max_tokens": 900,
            "stream": True,
            "speculative": {"type": "none"},
        }
        got_data = threading.Event()
        ended: list[str] = []

        def reader() -> None:
            try:
                with (
                    eng.client(timeout=60) as c,
                    c.stream("POST", "/v1/chat/completions", json=body) as r,
                ):
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            got_data.set()
                ended.append("eof")
            except httpx.HTTPError as exc:
                ended.append(repr(exc))
            finally:
                got_data.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        assert got_data.wait(60)
        t0 = time.monotonic()
        eng.proc.send_signal(signal.SIGTERM)
        code = eng.proc.wait(30)
        took = time.monotonic() - t0
        t.join(30)
    assert code == 0, "".join(eng.stderr_lines[-20:])
    assert took < 6, f"shutdown took {took:.1f} s with a stream open"
    assert ended, "the streaming client never saw the end of its stream"
    assert not any("Traceback" in line for line in eng.stderr_lines), "".join(
        eng.stderr_lines[-30:]
    )


def test_parent_pid_death_stops_the_engine_within_2_s() -> None:
    # The "parent" is a short-lived process that this test never reaps: it stays a zombie.
    parent = subprocess.Popen(["sleep", "600"])
    proc = subprocess.Popen(
        serve_command(
            "--port", "0", "--ctx", "512", "--threads", "1", "--parent-pid", str(parent.pid)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events = read_events(proc, 120)
        assert events and events[-1]["event"] == "ready", events
        parent.kill()
        t0 = time.monotonic()
        code = proc.wait(10)
        took = time.monotonic() - t0
        assert took < 2.5, f"the engine outlived its parent by {took:.1f} s"
        assert code == 0
    finally:
        for p in (proc, parent):
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_parent_pid_that_is_already_gone() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    proc = subprocess.Popen(
        serve_command("--port", "0", "--ctx", "512", "--parent-pid", str(gone.pid)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port"),
        (["--parent-pid", "-5"], "--parent-pid"),
        (["--timeout", "0"], "--timeout"),
        (["--queue-limit", "0"], "--queue-limit"),
        (["--ctx", "5"], "n_ctx"),
    ],
)
def test_bad_serve_arguments_are_one_error_event(args: list[str], words: str) -> None:
    proc = subprocess.run(serve_command(*args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["event"] for e in events] == ["error"]
    assert words in events[0]["message"]
    assert "\n" not in events[0]["message"]
    assert "Traceback" not in proc.stderr
