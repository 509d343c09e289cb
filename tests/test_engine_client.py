"""The OpenAI-compatible client: the real engine for the main paths, a loopback stub for failures.

Also the Qt-free start-up helpers of engine_launch.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.services.engine_client import (
    CancelToken,
    Delta,
    Endpoint,
    EngineClient,
    EngineClientError,
    Finished,
)
from app.services.engine_launch import (
    LaunchSpec,
    LineSplitter,
    Loading,
    LogTail,
    Ready,
    RestartPolicy,
    StartFailed,
    StartupWatch,
    describe_exit,
    parse_event,
    serve_command,
)
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
        for event in client.stream_chat(CHAT, {"max_tokens": 400}, cancel):
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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
    with EngineClient(Endpoint(url), read_timeout=60) as client:
        for event in client.stream_chat(CHAT, cancel=cancel):
            events.append(event)
            if isinstance(event, Delta):
                # The server has gone silent after one token; cancel from another thread
                # while this one waits in recv for a token that never comes.
                threading.Thread(
                    target=lambda: handler.headers_sent.wait(30) and cancel.cancel(), daemon=True
                ).start()
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
