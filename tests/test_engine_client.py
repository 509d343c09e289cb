"""The OpenAI-compatible client: the real engine for the main paths, a loopback stub for failures.

Also the Qt-free start-up helpers of engine_launch.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.services.engine.client import (
    CancelToken,
    Delta,
    Endpoint,
    EngineClient,
    EngineClientError,
    Finished,
)
from app.services.engine.control import (
    LoadDone,
    LoadFailed,
    LoadUnderway,
    follow_load,
    load_request,
)
from app.services.engine.launch import (
    LaunchSpec,
    LineSplitter,
    Loading,
    LogTail,
    Ready,
    RestartPolicy,
    StartFailed,
    StartupWatch,
    describe_exit,
    launch_spec,
    parse_event,
    serve_command,
)
from app.services.settings import EngineSettings, LoadSettings, LocalApi
from engine.wire.control import EngineStatus
from tests.engine_proc import EngineProc, running_engine

CHAT = [{"role": "user", "content": "Count from one to ten."}]


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[EngineProc]:
    with running_engine("--model", str(default_model)) as proc:
        yield proc


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Re-checks a condition until it holds (a bounded wait, not a fixed sleep)."""
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if predicate():
                return True
            done.wait(0.05)
        return predicate()
    finally:
        deadline.cancel()


# --- against the real engine ---------------------------------------------------


def test_streams_tokens_then_timings_and_usage(engine: EngineProc) -> None:
    with EngineClient(Endpoint(engine.base_url, engine.key)) as client:
        assert client.models() == [engine.ready["model"]]
        events = list(client.stream_chat(CHAT, {"max_tokens": 16, "temperature": 0}))
    deltas = [e for e in events if isinstance(e, Delta)]
    assert len(deltas) >= 2
    last = events[-1]
    assert isinstance(last, Finished)
    assert last.finish_reason in ("stop", "length")
    assert last.timings["predicted_n"] >= 1
    assert {"prompt_n", "cache_n", "predicted_per_second", "draft_n"} <= set(last.timings)
    assert last.usage["completion_tokens"] >= 1
    assert last.ttft_ms is not None and last.ttft_ms > 0
    assert last.model == engine.ready["model"]


def test_cancel_stops_within_one_token_and_frees_the_engine(engine: EngineProc) -> None:
    cancel = CancelToken()
    seen: list[object] = []
    with EngineClient(Endpoint(engine.base_url + "/v1/", engine.key)) as client:
        # Greedy and a long answer: a sampled one was once over after two tokens.
        long_answer = [{"role": "user", "content": "Write a long story about a falcon."}]
        for event in client.stream_chat(long_answer, {"max_tokens": 400, "temperature": 0}, cancel):
            seen.append(event)
            if isinstance(event, Delta) and len(seen) == 3:
                cancel.cancel()
        # Nothing after the cancel but the closing event.
        assert [type(e) for e in seen] == [Delta, Delta, Delta, Finished]
        assert isinstance(seen[-1], Finished) and seen[-1].finish_reason == "cancelled"
        assert _wait_for(lambda: (client.status() or {}).get("state") == "ready")
        status = client.status()
    assert status is not None
    assert status["settings"]["n_ctx"] > 0
    assert status["memory"]["total"] > 0


def test_a_wrong_key_is_an_auth_error(engine: EngineProc) -> None:
    with (
        EngineClient(Endpoint(engine.base_url, "not-the-key")) as client,
        pytest.raises(EngineClientError, match="refused the API key") as info,
    ):
        list(client.stream_chat(CHAT, {"max_tokens": 4}))
    assert info.value.kind == "auth"


def test_a_bad_request_carries_the_servers_message(engine: EngineProc) -> None:
    with (
        EngineClient(Endpoint(engine.base_url, engine.key)) as client,
        pytest.raises(EngineClientError) as info,
    ):
        list(client.stream_chat(CHAT, {"max_tokens": 0}))
    assert info.value.kind == "request" and info.value.status == 400
    assert "max_tokens" in str(info.value)


# --- failure paths against a loopback stub -------------------------------------


class _Stub(BaseHTTPRequestHandler):
    behaviour = "ok"
    headers_sent = threading.Event()
    release = threading.Event()
    handler_done = threading.Event()

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.behaviour == "server_error":
            body = json.dumps({"error": {"message": "queue is full", "type": "x", "code": None}})
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()
        if self.behaviour == "garbage":
            self.wfile.write(b"data: {not json\n\n")
        elif self.behaviour == "hang":
            _Stub.headers_sent.set()
            _Stub.release.wait(30)
        elif self.behaviour == "error_event":
            self.wfile.write(b'data: {"error": {"message": "decoder failed"}}\n\n')
        # "drop": the connection closes without [DONE]
        self.close_connection = True
        _Stub.handler_done.set()


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    _Stub.headers_sent = threading.Event()
    _Stub.release = threading.Event()
    _Stub.handler_done = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Stub
    _Stub.release.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("behaviour", "kind", "words"),
    [
        ("drop", "lost", "lost in the middle"),
        ("garbage", "protocol", "not JSON"),
        ("error_event", "server", "decoder failed"),
        ("server_error", "server", "queue is full"),
    ],
)
def test_failures_are_named_in_plain_words(
    stub: tuple[str, type[_Stub]], behaviour: str, kind: str, words: str
) -> None:
    url, handler = stub
    handler.behaviour = behaviour
    received: list[str] = []
    with (
        EngineClient(Endpoint(url)) as client,
        pytest.raises(EngineClientError, match=words) as info,
    ):
        for event in client.stream_chat(CHAT):
            if isinstance(event, Delta):
                received.append(event.text)
    assert info.value.kind == kind
    if behaviour != "server_error":
        assert received == ["Hel"]  # what arrived before the failure was delivered


def test_cancel_wakes_a_stream_stuck_waiting_for_the_next_token(
    stub: tuple[str, type[_Stub]],
) -> None:
    url, handler = stub
    handler.behaviour = "hang"
    cancel = CancelToken()
    events: list[object] = []

    def cancel_once_silent() -> None:
        if handler.headers_sent.wait(30):
            cancel.cancel()

    with EngineClient(Endpoint(url), read_timeout=60) as client:
        for event in client.stream_chat(CHAT, cancel=cancel):
            events.append(event)
            if isinstance(event, Delta):
                # The server has gone silent after one token; cancel from another thread
                # while this one waits in recv for a token that never comes.
                threading.Thread(target=cancel_once_silent, daemon=True).start()
    # It returned while the server was still hanging: the cancel woke the read.
    assert not handler.release.is_set() and not handler.handler_done.is_set()
    assert [type(e) for e in events] == [Delta, Finished]
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "cancelled"


def test_an_unreachable_server_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with EngineClient(Endpoint(f"http://127.0.0.1:{port}/v1")) as client:
            with pytest.raises(EngineClientError, match="cannot reach") as info:
                list(client.stream_chat(CHAT))
            assert info.value.kind == "connect"
            with pytest.raises(EngineClientError, match="cannot reach"):
                client.status()


def test_endpoint_accepts_urls_with_or_without_v1() -> None:
    assert Endpoint("http://h:1").api_root == "http://h:1/v1"
    assert Endpoint("http://h:1/v1/").api_root == "http://h:1/v1"
    assert Endpoint("https://h/api/v1").api_root == "https://h/api/v1"


# --- Stop before the server answers ---------------------------------------------


def _stream_in_thread(
    client: EngineClient, cancel: CancelToken
) -> tuple[threading.Thread, list[object]]:
    """Runs one stream on a worker thread, as the app does; results holds events or the error."""
    results: list[object] = []

    def run() -> None:
        try:
            results.extend(client.stream_chat(CHAT, cancel=cancel))
        except EngineClientError as exc:
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


def test_stop_works_while_the_server_has_not_answered() -> None:
    # A listener that never accepts: the kernel completes the handshake, nobody answers
    # (a hung server, or the engine holding the request in its queue).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        cancel = CancelToken()
        with EngineClient(Endpoint(f"http://127.0.0.1:{port}"), read_timeout=60) as client:
            thread, results = _stream_in_thread(client, cancel)
            conn, _ = listener.accept()  # the client is connected and sending
            with conn:
                assert conn.recv(65536).startswith(b"POST /v1/chat/completions")
                cancel.cancel()
                thread.join(10)  # far under the 60 s read timeout it would wait without Stop
                assert not thread.is_alive()
    assert [type(e) for e in results] == [Finished]
    assert isinstance(results[0], Finished) and results[0].finish_reason == "cancelled"


def test_a_cancel_that_comes_before_the_socket_shuts_it_down_when_it_arrives() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cancel = CancelToken()
        cancel.cancel()
        cancel._attach(ours)
        theirs.settimeout(10)
        assert theirs.recv(1) == b""  # shut down at once: the peer sees the end


def test_a_cancelled_token_never_connects() -> None:
    cancel = CancelToken()
    cancel.cancel()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        # A short read timeout: a client that did connect fails here instead of hanging.
        with EngineClient(Endpoint(url), read_timeout=5) as client:
            events = list(client.stream_chat(CHAT, cancel=cancel))
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert events == [Finished("cancelled")]


# --- odd but valid (or real) servers, scripted byte for byte -------------------------


class _Scripted(socketserver.StreamRequestHandler):
    """Reads one request, writes the server's scripted bytes, then holds or closes."""

    server: _ScriptedServer

    def handle(self) -> None:
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.rfile.read(length)
        self.wfile.write(self.server.reply)
        self.wfile.flush()
        if self.server.hold:
            self.server.replied.set()
            self.server.release.wait(30)


class _ScriptedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    reply = b""
    hold = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Scripted)
        self.replied = threading.Event()
        self.release = threading.Event()


@pytest.fixture
def scripted() -> Iterator[_ScriptedServer]:
    server = _ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _url(server: _ScriptedServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _reply(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


def _sse(body: bytes) -> bytes:
    return _reply("200 OK", "text/event-stream", body)


def _chunk(text: str | None = None, finish: str | None = None, **extra: object) -> bytes:
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps({"choices": [choice], **extra}).encode()


def _collect(server: _ScriptedServer) -> tuple[list[str], Finished]:
    with EngineClient(Endpoint(_url(server)), read_timeout=30) as client:
        events = list(client.stream_chat(CHAT))
    last = events[-1]
    assert isinstance(last, Finished)
    assert all(isinstance(e, Delta) for e in events[:-1])
    return [e.text for e in events[:-1] if isinstance(e, Delta)], last


def test_stop_works_after_headers_when_no_token_follows(scripted: _ScriptedServer) -> None:
    scripted.reply = _reply("200 OK", "text/event-stream", b"")
    scripted.hold = True
    cancel = CancelToken()
    with EngineClient(Endpoint(_url(scripted)), read_timeout=60) as client:
        thread, results = _stream_in_thread(client, cancel)
        assert scripted.replied.wait(30)
        cancel.cancel()
        thread.join(10)
        assert not thread.is_alive()
    assert not scripted.release.is_set()  # the server was still holding the answer
    assert results == [Finished("cancelled")]


@pytest.mark.parametrize(
    ("body", "texts"),
    [
        # Valid SSE: data lines join with "\n" until the blank line.
        (b'data: {"choices": [{"delta":\ndata: {"content": "Hi"}}]}\n\ndata: [DONE]\n\n', ["Hi"]),
        (b"data:\n\ndata: " + _chunk("Hi") + b"\n\ndata: [DONE]\n\n", ["Hi"]),
        (
            b": keep-alive\n\nevent: message\nid: 1\nretry: 1000\ndata:"
            + _chunk("Hi")
            + b"\n\ndata:[DONE]\n\n",
            ["Hi"],
        ),
        (
            b"data: "
            + _chunk("a")
            + b"\r\n\r\ndata: "
            + _chunk("b")
            + b"\r\n\r\ndata: [DONE]\r\n\r\n",
            ["a", "b"],
        ),
        # "error": null is no error.
        (
            b'data: {"error": null, "choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n',
            ["Hi"],
        ),
        # Content parts: the text parts are the answer.
        (
            b'data: {"choices": [{"delta": {"content": [{"type": "thinking", "thinking": "hm"},'
            b' {"type": "text", "text": "Hi"}]}}]}\n\ndata: [DONE]\n\n',
            ["Hi"],
        ),
        # Chunks on consecutive lines without the blank line between them.
        (b"data: " + _chunk("a") + b"\ndata: " + _chunk("b") + b"\n\ndata: [DONE]\n\n", ["a", "b"]),
        # The server said it finished, then closed without [DONE] ...
        (b"data: " + _chunk("Hi", "stop") + b"\n\n", ["Hi"]),
        # ... or without the blank line after [DONE].
        (b"data: " + _chunk("Hi") + b"\n\ndata: [DONE]\n", ["Hi"]),
    ],
    ids=[
        "multiline",
        "empty-data",
        "comments",
        "crlf",
        "error-null",
        "parts",
        "no-blank",
        "no-done",
        "done-at-eof",
    ],
)
def test_odd_but_valid_streams_give_the_whole_answer(
    scripted: _ScriptedServer, body: bytes, texts: list[str]
) -> None:
    scripted.reply = _sse(body)
    received, last = _collect(scripted)
    assert received == texts
    assert last.finish_reason == "stop"


def test_malformed_figures_are_dropped_and_finished_always_has_dicts(
    scripted: _ScriptedServer,
) -> None:
    timings = {"predicted_n": 3, "predicted_per_second": "fast", "prompt_ms": None, "draft_n": True}
    scripted.reply = _sse(
        b"data: " + _chunk("Hi", timings=[1, 2], usage="lots", model=5) + b"\n\n"
        b"data: " + _chunk(finish="length", timings=timings) + b"\n\n"
        b'data: {"choices": [], "timings": {"prompt_n": Infinity, "cache_n": NaN}}\n\n'
        b"data: [DONE]\n\n"
    )
    received, last = _collect(scripted)
    assert received == ["Hi"]
    assert last.finish_reason == "length"
    assert last.timings == {"predicted_n": 3}  # only finite numbers: callers compute with them
    assert last.usage == {} and last.model == ""


@pytest.mark.parametrize(
    ("chunk", "words"),
    [
        (b'{"choices": ["Hi"]}', "a choice that is a string, not an object"),
        (b'{"choices": [{"delta": {"content": 5}}]}', "delta.content that is a number, not text"),
        (b'{"choices": [{"delta": "Hi"}]}', "a delta that is a string, not an object"),
        (b'{"choices": {"0": {}}}', "choices that are an object, not a list"),
        (b'{"error": {"message": "out of memory"}}', "out of memory"),
        (b'{"error": "boom"}', "boom"),
    ],
)
def test_malformed_text_is_a_clear_protocol_error(
    scripted: _ScriptedServer, chunk: bytes, words: str
) -> None:
    scripted.reply = _sse(b"data: " + _chunk("Hel") + b"\n\ndata: " + chunk + b"\n\n")
    received: list[str] = []
    with (
        EngineClient(Endpoint(_url(scripted))) as client,
        pytest.raises(EngineClientError, match=words) as info,
    ):
        for event in client.stream_chat(CHAT):
            if isinstance(event, Delta):
                received.append(event.text)
    assert received == ["Hel"]
    assert info.value.kind == ("server" if b"error" in chunk else "protocol")


def test_an_sse_error_event_carries_the_servers_message(scripted: _ScriptedServer) -> None:
    scripted.reply = _sse(b'event: error\ndata: {"error": {"message": "overloaded"}}\n\n')
    with (
        EngineClient(Endpoint(_url(scripted))) as client,
        pytest.raises(EngineClientError, match="overloaded") as info,
    ):
        list(client.stream_chat(CHAT))
    assert info.value.kind == "server"


def test_a_whole_json_answer_from_a_server_that_ignored_stream(scripted: _ScriptedServer) -> None:
    body = {
        "model": "m1",
        "choices": [
            {
                "message": {"role": "assistant", "content": "The full answer"},
                "finish_reason": "length",
            }
        ],
        "usage": {"completion_tokens": 3},
    }
    scripted.reply = _reply("200 OK", "application/json; charset=utf-8", json.dumps(body).encode())
    received, last = _collect(scripted)
    assert received == ["The full answer"]
    assert (last.finish_reason, last.usage, last.model) == (
        "length",
        {"completion_tokens": 3},
        "m1",
    )


def test_an_event_stream_labelled_json_is_read_as_a_stream(scripted: _ScriptedServer) -> None:
    scripted.reply = _reply(
        "200 OK", "application/json", b"data: " + _chunk("Hi") + b"\n\ndata: [DONE]\n\n"
    )
    assert _collect(scripted)[0] == ["Hi"]


@pytest.mark.parametrize(
    ("status", "content_type", "body", "kind", "words"),
    [
        # 200 with a JSON error body, e.g. a server that ignored stream and failed.
        (
            "200 OK",
            "application/json",
            b'{"error": {"message": "model llama3 is not loaded"}}',
            "server",
            "llama3 is not loaded",
        ),
        ("200 OK", "application/json", b'{"id": 1}', "protocol", "not a chat completion"),
        ("200 OK", "application/json", b"[1, 2]", "protocol", "not an object"),
        ("200 OK", "application/json", b"{truncated", "protocol", "answer is not JSON"),
        ("200 OK", "text/html", b"<html>a web app</html>", "protocol", "web page"),
        # What vLLM and OpenAI answer for an unknown model.
        (
            "404 Not Found",
            "application/json",
            b'{"error": {"message": "The model `x` does not exist", "type": "invalid_request_error",'
            b' "code": "model_not_found"}}',
            "request",
            r"The model `x` does not exist \(.*404\)",
        ),
        (
            "404 Not Found",
            "application/json",
            b'{"detail": "Not Found"}',
            "request",
            "no OpenAI-compatible API here",
        ),
        (
            "401 Unauthorized",
            "application/json",
            b'{"error": {"message": "Incorrect API key provided"}}',
            "auth",
            r"refused the API key \(401: Incorrect API key provided\)",
        ),
        (
            "502 Bad Gateway",
            "text/html",
            b"<html><h1>502 Bad Gateway</h1></html>",
            "server",
            "^the server answered HTTP 502$",
        ),
        ("500 Internal Server Error", "application/json", b"[" * 50_000, "server", r"^\[\[\["),
    ],
)
def test_answers_that_are_not_streams_are_named(
    scripted: _ScriptedServer, status: str, content_type: str, body: bytes, kind: str, words: str
) -> None:
    scripted.reply = _reply(status, content_type, body)
    with (
        EngineClient(Endpoint(_url(scripted))) as client,
        pytest.raises(EngineClientError, match=words) as info,
    ):
        list(client.stream_chat(CHAT))
    assert info.value.kind == kind


def test_a_model_list_that_is_not_json_is_a_protocol_error(scripted: _ScriptedServer) -> None:
    scripted.reply = _reply("200 OK", "application/json", b"<not json>")
    with (
        EngineClient(Endpoint(_url(scripted))) as client,
        pytest.raises(EngineClientError, match="model list is not JSON") as info,
    ):
        client.models()
    assert info.value.kind == "protocol"


# --- engine_launch -------------------------------------------------------------


def test_serve_command_carries_the_spec_and_the_parent_pid(tmp_path: Path) -> None:
    spec = LaunchSpec(model=tmp_path / "m.gguf", n_ctx=2048, threads=2)
    argv = serve_command(spec, parent_pid=4242, python="/py")
    assert argv[:4] == ["/py", "-m", "app.cli", "serve"]
    joined = " ".join(argv)
    assert f"--model {tmp_path / 'm.gguf'}" in joined
    assert "--port 0" in joined and "--parent-pid 4242" in joined
    assert "--ctx 2048" in joined and "--threads 2" in joined
    assert "--draft-model" not in joined


def test_a_launch_spec_takes_the_models_settings_and_keeps_the_key_off_the_command_line(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.gguf"
    load = LoadSettings(n_ctx=1024, type_k="q8_0", n_gpu_layers=0, draft_model="/d.gguf")
    engine = EngineSettings(n_ctx=8192, threads=3)
    api = LocalApi(shared=True, port=8123, api_key="pk-secret-key-0123456789")
    spec = launch_spec(model, load, engine, api)
    assert (spec.n_ctx, spec.threads, spec.port) == (1024, 3, 8123)
    assert spec.api_key == "pk-secret-key-0123456789"
    assert "pk-secret" not in repr(spec)
    argv = serve_command(spec, parent_pid=1)
    joined = " ".join(argv)
    assert "pk-secret" not in joined and "--api-key" not in joined
    assert "--port 8123" in joined and "--ctx 1024" in joined and "--threads 3" in joined
    assert "--cache-type-k q8_0" in joined and "--gpu-layers 0" in joined
    assert "--draft-model /d.gguf" in joined
    # Not shared: a free port and the engine's own random key.
    private = launch_spec(model, LoadSettings(), engine, LocalApi(shared=False, api_key="k"))
    assert (private.port, private.api_key, private.n_ctx) == (0, "", 8192)
    # Switching models keeps the engine's port and key.
    other = spec.with_model(tmp_path / "o.gguf", LoadSettings(), engine)
    assert (other.model, other.port, other.api_key, other.n_ctx) == (
        tmp_path / "o.gguf",
        8123,
        spec.api_key,
        8192,
    )


def _status(**fields: object) -> EngineStatus:
    base: dict[str, object] = {
        "state": "ready",
        "load_progress": 1.0,
        "error": None,
        "model": {"id": "a", "path": "/m/a.gguf"},
        "settings": None,
        "memory": {},
        "speculative": {},
        "runtime": {"name": "default", "backend": "cpu"},
        "queue": {"waiting": 0, "limit": 16},
    }
    return EngineStatus.model_validate({**base, **fields})


def test_following_a_load_through_the_engine_status() -> None:
    assert follow_load(_status(state="loading", load_progress=0.4), "/m/b.gguf") == LoadUnderway(
        0.4
    )
    done = _status(model={"id": "b", "path": "/m/b.gguf"})
    assert follow_load(done, "/m/b.gguf") == LoadDone("/m/b.gguf")
    # Refused: the previous model serves on, and the reason is the engine's.
    kept = _status(error="model file not found: /m/b.gguf")
    assert follow_load(kept, "/m/b.gguf") == LoadFailed(
        "model file not found: /m/b.gguf", "/m/a.gguf"
    )
    gone = _status(state="error", error="llama.cpp refused it", model=None)
    assert follow_load(gone, "/m/b.gguf") == LoadFailed("llama.cpp refused it", None)
    other = follow_load(_status(), "/m/b.gguf")
    assert isinstance(other, LoadFailed) and other.serving == "/m/a.gguf"
    request = load_request(
        Path("/m/b.gguf"), LoadSettings(type_v="q4_0"), EngineSettings(threads=2)
    )
    assert (request.model, request.n_ctx, request.threads, request.type_v) == (
        "/m/b.gguf",
        4096,
        2,
        "q4_0",
    )


def test_start_up_events_are_parsed_and_junk_is_ignored() -> None:
    assert parse_event('{"event": "loading", "progress": 0.5}') == Loading(0.5)
    assert parse_event('{"event": "loading", "progress": 7}') == Loading(1.0)
    ready = parse_event('{"event":"ready","host":"127.0.0.1","port":5,"api_key":"k","model":"m"}')
    assert ready == Ready("127.0.0.1", 5, "k", "m")
    assert isinstance(ready, Ready) and ready.base_url == "http://127.0.0.1:5/v1"
    assert parse_event('{"event": "error", "message": "no such file"}') == StartFailed(
        "no such file"
    )
    for junk in ("", "hello", "[1]", '{"event": "ready"}', '{"event": "other"}'):
        assert parse_event(junk) is None


def test_line_splitter_and_bounded_log_tail() -> None:
    splitter = LineSplitter()
    assert splitter.feed('{"a"') == []
    assert splitter.feed(': 1}\r\n{"b": 2}\npart') == ['{"a": 1}', '{"b": 2}']
    assert splitter.flush() == ["part"]
    tail = LogTail(max_lines=3)
    tail.feed("one\ntwo\nthree\nfour\nfi")
    assert tail.lines() == ["three", "four", "fi"]
    assert tail.text(1) == "fi"
    assert "Its last words: fi" in describe_exit(1, False, tail.lines())
    assert "crashed or was killed" in describe_exit(9, True, [])


def test_restart_policy_and_stall_watch_follow_the_clock() -> None:
    now = [0.0]
    policy = RestartPolicy(lambda: now[0], max_restarts=2, window_s=60)
    assert policy.allow() and policy.delay_s() == 0.0
    assert policy.allow() and policy.delay_s() == 0.5
    assert not policy.allow()  # a crash loop is not restarted forever
    now[0] = 61.0
    assert policy.allow()
    watch = StartupWatch(10.0, lambda: now[0])
    now[0] += 9
    watch.saw(Loading(0.3))  # progress resets the stall timeout
    now[0] += 9
    assert not watch.stalled()
    now[0] += 2
    assert watch.stalled()


def _call_chunk(index: int, **piece: object) -> bytes:
    choice = {"index": 0, "delta": {"tool_calls": [{"index": index, **piece}]}}
    return json.dumps({"choices": [choice]}).encode()


def test_streamed_tool_calls_are_assembled(scripted: _ScriptedServer) -> None:
    # As the engine and OpenAI send them: index, id, type and name first, then
    # fragments of the arguments; two calls interleaved; a name split in two
    # (some servers do; the openai client joins them); a call without an id.
    events = [
        _chunk("Checking."),
        _call_chunk(0, id="call_a", type="function", function={"name": "get_", "arguments": ""}),
        _call_chunk(0, function={"name": "weather"}),
        _call_chunk(1, type="function", function={"name": "get_time", "arguments": '{"zone"'}),
        _call_chunk(0, function={"arguments": '{"city": "Pa'}),
        _call_chunk(0, function={"arguments": 'ris"}'}),
        _call_chunk(1, function={"arguments": ': "Europe/Oslo"}'}),
        _chunk(finish="tool_calls"),
    ]
    scripted.reply = _sse(b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n")
    texts, finished = _collect(scripted)
    assert texts == ["Checking."]
    assert finished.finish_reason == "tool_calls"
    first, second = finished.tool_calls
    assert first == {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert second["function"] == {"name": "get_time", "arguments": '{"zone": "Europe/Oslo"}'}
    assert second["id"].startswith("call_") and len(second["id"]) == len("call_") + 24


def test_a_whole_answer_with_tool_calls_and_a_bad_one(scripted: _ScriptedServer) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    scripted.reply = _reply("200 OK", "application/json", json.dumps(body).encode())
    texts, finished = _collect(scripted)
    assert (texts, finished.tool_calls) == ([], (call,))
    bad = {"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]}
    scripted.reply = _sse(b"data: " + json.dumps(bad).encode() + b"\n\n")
    with pytest.raises(EngineClientError, match="tool_calls that is an object, not a list"):
        _collect(scripted)
