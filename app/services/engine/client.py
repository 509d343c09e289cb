"""A Qt-free client for any OpenAI-compatible server: Peregrine's engine or another.

Streams chat completions over SSE and yields plain data. It blocks while it
reads, so the app runs it on a worker thread; `CancelToken.cancel()` may be
called from any other thread and stops the stream within one token (the
connection is shut down, which also stops generation on the server).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx2 as httpx
from pydantic import ValidationError

from engine.errors import PeregrineError
from engine.wire.control import EngineStatus, LoadRequest

log = logging.getLogger(__name__)


class ErrorKind(StrEnum):
    """What went wrong with a request, so callers can react without parsing words."""

    CONNECT = "connect"  # the server cannot be reached
    AUTH = "auth"  # the key was refused
    REQUEST = "request"  # the server refused this request (4xx)
    SERVER = "server"  # the server failed (5xx, an error event)
    LOST = "lost"  # the connection broke or timed out mid-answer
    PROTOCOL = "protocol"  # the server's answer is not what the API promises
    INTERNAL = "internal"  # a bug on our side


class EngineClientError(PeregrineError):
    """A request that failed, in words a user can act on."""

    def __init__(
        self, message: str, kind: ErrorKind = ErrorKind.REQUEST, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """Where a server is and how to authenticate; base_url with or without /v1."""

    base_url: str
    api_key: str = ""
    model: str = ""  # empty: whatever the server serves by default

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


@dataclass(frozen=True)
class Delta:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a stream. finish_reason is "cancelled" when the client stopped it."""

    finish_reason: str
    timings: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    ttft_ms: float | None = None
    model: str = ""
    # The answer's tool calls, assembled, in OpenAI's shape: {"id", "type":
    # "function", "function": {"name", "arguments"}}, arguments as JSON text.
    tool_calls: tuple[dict[str, Any], ...] = ()


StreamEvent = Delta | Finished


@dataclass(frozen=True)
class ServerFigures:
    """What the status bar shows about a server; None where the server does not say."""

    n_ctx: int | None = None
    memory_total: int | None = None
    memory_parts: dict[str, int] = field(default_factory=dict)
    drafter: str | None = None
    acceptance: float | None = None
    draft_model: str | None = None
    draft_acceptance: float | None = None
    # The model's tool-call format and its self-test: None while it has not run.
    tool_format: str | None = None
    tool_self_test: bool | None = None
    tool_detail: str | None = None
    # The engine runtime in use, and why it is not the one asked for (None: it is).
    runtime: str | None = None
    runtime_backend: str | None = None
    runtime_fallback: str | None = None


class CancelToken:
    """Stops one stream from another thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        self._event.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            _shut_down(sock)

    def _attach(self, sock: socket.socket | None) -> None:
        """Remembers the stream's socket; shuts it down at once if already cancelled."""
        with self._lock:
            self._sock = sock
            # Under the lock: either cancel() sees this socket or this sees the cancel.
            late = sock is not None and self._event.is_set()
        if late and sock is not None:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    # shutdown (not close) wakes a thread blocked in connect's aftermath, send or recv.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as exc:
        log.debug("socket already closed while cancelling: %s", exc)


class EngineClient:
    """Talks to one OpenAI-compatible endpoint. Use from one thread at a time."""

    def __init__(
        self,
        endpoint: Endpoint,
        transport: httpx.BaseTransport | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        # Our engine admits the app's own chat ahead of queued API requests (docs/api.md).
        headers["X-Peregrine-Client"] = "app"
        self._http = httpx.Client(
            base_url=endpoint.api_root,
            headers=headers,
            transport=transport,
            # A big prompt can take minutes before the first token; connect fails fast.
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            # No pooled connections: every stream opens its own, so the connect trace
            # always hands its socket to the CancelToken.
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,
        )
        self._clock = clock

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields Delta per token and one Finished last (with the answer's tool calls);
        raises EngineClientError."""
        cancel = cancel or CancelToken()
        if cancel.cancelled:
            yield Finished("cancelled")
            return
        body: dict[str, Any] = {**(params or {}), "messages": messages, "stream": True}
        if self.endpoint.model and "model" not in body:
            body["model"] = self.endpoint.model
        answer = _Answer(self._clock)
        try:
            with self._http.stream(
                "POST",
                "/chat/completions",
                json=body,
                # The socket reaches the token the moment it is connected, so Stop works
                # while the server has not answered yet (a queued request, a hung server).
                extensions={"trace": _socket_tracer(cancel)},
            ) as response:
                cancel._attach(_socket_of(response))
                if cancel.cancelled:
                    yield answer.finished("cancelled")
                    return
                if response.status_code != 200:
                    response.read()
                    raise _http_error(response, self.endpoint)
                lines: Iterator[str] = response.iter_lines()
                media_type = _media_type(response)
                if media_type == "application/json" or media_type.endswith("+json"):
                    content = response.read()
                    if not content.lstrip().startswith(b"data:"):
                        # A server that ignored "stream": true: one whole completion.
                        yield from answer.whole(_json_body(content, "answer"))
                        yield answer.finished()
                        return
                    # An event stream labelled as JSON: read it as the stream it is.
                    lines = iter(content.decode("utf-8", "replace").splitlines())
                if media_type == "text/html":
                    raise EngineClientError(
                        f"{self.endpoint.api_root} answered with a web page, "
                        "not an OpenAI-compatible stream",
                        kind=ErrorKind.PROTOCOL,
                    )
                events = _SseEvents()
                for line in lines:
                    if cancel.cancelled:
                        break
                    event = events.feed(line)
                    if event is None:
                        continue
                    name, payload = event
                    if payload == "[DONE]":
                        yield answer.finished()
                        return
                    if name == "error":
                        raise EngineClientError(_event_error(payload), kind=ErrorKind.SERVER)
                    for delta in answer.take_payload(payload):
                        yield delta
                        if cancel.cancelled:
                            break
                if not cancel.cancelled and (events.pending() == "[DONE]" or answer.finish_reason):
                    # Closed without [DONE] (or without the blank line after it), but the
                    # server had already said the answer was complete.
                    yield answer.finished()
                    return
        except httpx.ConnectError as exc:
            if not cancel.cancelled:
                raise EngineClientError(
                    f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                    kind=ErrorKind.CONNECT,
                ) from exc
        except httpx.TimeoutException as exc:
            if not cancel.cancelled:
                raise EngineClientError(
                    f"the server at {self.endpoint.api_root} stopped answering (timed out)",
                    kind=ErrorKind.LOST,
                ) from exc
        except (httpx.TransportError, OSError) as exc:
            if not cancel.cancelled:
                raise EngineClientError(
                    "the connection to the server was lost in the middle of the answer",
                    kind=ErrorKind.LOST,
                ) from exc
        finally:
            cancel._attach(None)
        if cancel.cancelled:
            yield answer.finished("cancelled")
            return
        raise EngineClientError(
            "the connection to the server was lost in the middle of the answer", kind=ErrorKind.LOST
        )

    def _request(
        self, method: str, path: str, *, json_body: Any = None, timeout: float = 10.0
    ) -> httpx.Response:
        try:
            return self._http.request(method, path, json=json_body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind=ErrorKind.CONNECT,
            ) from exc

    def status(self) -> dict[str, Any] | None:
        """Peregrine's /v1/engine/status, or None for servers that do not have it."""
        response = self._request("GET", "/engine/status", timeout=5.0)
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            raise _http_error(response, self.endpoint)
        data = _json_body(response.content, "status")
        return data if isinstance(data, dict) else None

    def engine_status(self) -> EngineStatus | None:
        """The status as the engine's wire type; None for servers that are not Peregrine."""
        data = self.status()
        if data is None:
            return None
        try:
            return EngineStatus.model_validate(data)
        except ValidationError as exc:
            raise EngineClientError(
                f"the server's engine status is not Peregrine's: {exc.errors()[0]['msg']}",
                ErrorKind.PROTOCOL,
            ) from exc

    def load(self, request: LoadRequest) -> None:
        """Asks the engine to load a model (202 at once; follow it with engine_status)."""
        response = self._request("POST", "/engine/load", json_body=request.model_dump(mode="json"))
        if response.status_code not in (200, 202):
            raise _http_error(response, self.endpoint)

    def unload(self) -> None:
        """Asks the engine to unload its model (done, or done once running answers end)."""
        response = self._request("POST", "/engine/unload", timeout=60.0)
        if response.status_code not in (200, 202):
            raise _http_error(response, self.endpoint)

    def figures(self) -> ServerFigures | None:
        """Context, memory and speculation of the server, from whichever route it has.

        Peregrine's /v1/engine/status first, then llama-server's /props; None when
        the server offers neither (the status bar then shows dashes).
        """
        status = self.engine_status()
        if status is not None:
            settings = status.settings
            return ServerFigures(
                n_ctx=settings.n_ctx if settings else None,
                memory_total=status.memory.total or None,
                memory_parts={
                    "weights": status.memory.weights,
                    "KV cache": status.memory.kv,
                    "compute": status.memory.compute,
                },
                drafter=status.speculative.drafter,
                acceptance=status.speculative.acceptance,
                draft_model=status.speculative.draft_model,
                draft_acceptance=status.speculative.draft_acceptance,
                tool_format=status.tool_format.name if status.tool_format else None,
                tool_self_test=status.tool_format.self_test if status.tool_format else None,
                tool_detail=status.tool_format.detail if status.tool_format else None,
                runtime=status.runtime.name,
                runtime_backend=status.runtime.backend,
                runtime_fallback=status.runtime.fallback_reason,
            )
        root = self.endpoint.api_root.removesuffix("/v1")
        try:
            response = self._http.get(root + "/props", timeout=5.0)
        except httpx.HTTPError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind=ErrorKind.CONNECT,
            ) from exc
        if response.status_code != 200 or "json" not in _media_type(response):
            return None
        try:
            props = json.loads(response.content)
        except (ValueError, RecursionError):
            return None
        gen = props.get("default_generation_settings") if isinstance(props, dict) else None
        n_ctx = (gen or {}).get("n_ctx") if isinstance(gen, dict) else None
        if n_ctx is None and isinstance(props, dict):
            n_ctx = props.get("n_ctx")
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
            return ServerFigures(n_ctx=n_ctx)
        return None

    def models(self) -> list[str]:
        """The model ids the server offers."""
        try:
            response = self._http.get("/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind=ErrorKind.CONNECT,
            ) from exc
        if response.status_code != 200:
            raise _http_error(response, self.endpoint)
        data = _json_body(response.content, "model list")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise EngineClientError("the server's model list has no data array", ErrorKind.PROTOCOL)
        return [str(m["id"]) for m in models if isinstance(m, dict) and m.get("id") is not None]


def _socket_tracer(cancel: CancelToken) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore trace callback that hands each new connection's socket to the token."""

    def trace(event: str, info: dict[str, Any]) -> None:
        # start_tls wraps the TCP socket in a new one; the newest is the one to shut down.
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            sock = _socket_of_stream(info.get("return_value"))
            if sock is not None:
                cancel._attach(sock)

    return trace


def _socket_of(response: httpx.Response) -> socket.socket | None:
    return _socket_of_stream(response.extensions.get("network_stream"))


def _socket_of_stream(stream: Any) -> socket.socket | None:
    if stream is None:
        return None
    try:
        sock = stream.get_extra_info("socket")
    except Exception as exc:  # transports differ; cancelling then waits for the next token
        log.debug("no socket for cancellation: %s", exc)
        return None
    return sock if isinstance(sock, socket.socket) else None


class _SseEvents:
    """Turns the lines of a server-sent-events stream into (event name, data) pairs.

    Follows the SSE rules: data lines are joined with newlines until a blank line,
    comments and unknown fields are skipped, one space after the colon is dropped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._name = ""

    def feed(self, line: str) -> tuple[str, str] | None:
        """Takes one line; returns an event when the line completes one with data."""
        if not line:
            data = "\n".join(self._data).strip()
            name = self._name or "message"
            self._data, self._name = [], ""
            return (name, data) if data else None
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        return None

    def pending(self) -> str:
        """The data of an event the stream ended before completing."""
        return "\n".join(self._data).strip()


class _Answer:
    """What one answer has gathered so far: its figures, model and finish reason."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._started = clock()
        self.ttft_ms: float | None = None
        self.finish_reason = ""
        self.timings: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self.model = ""
        self._ignored: set[str] = set()
        self._calls: dict[int, _CallParts] = {}

    def finished(self, reason: str | None = None) -> Finished:
        return Finished(
            reason or self.finish_reason or "stop",
            dict(self.timings),
            dict(self.usage),
            self.ttft_ms,
            self.model,
            tuple(self._calls[i].as_call() for i in sorted(self._calls)),
        )

    def take_payload(self, payload: str) -> Iterator[Delta]:
        """The text of one SSE event's data (normally one chunk)."""
        for chunk in _json_chunks(payload):
            yield from self.take(chunk, "delta")

    def whole(self, body: Any) -> Iterator[Delta]:
        """The text of a whole (non-streamed) chat.completion."""
        if not isinstance(body, dict):
            raise EngineClientError(
                "the server's answer is JSON but not an object", ErrorKind.PROTOCOL
            )
        if not body.get("error") and not isinstance(body.get("choices"), list):
            raise EngineClientError(
                "the server's answer is JSON but not a chat completion (no choices)",
                ErrorKind.PROTOCOL,
            )
        yield from self.take(body, "message")

    def take(self, chunk: dict[str, Any], part: str) -> Iterator[Delta]:
        """Gathers a chunk's figures and yields its text; part is "delta" or "message"."""
        if chunk.get("error"):
            raise EngineClientError(
                _error_message(chunk) or f"the server reported an error: {_short(chunk['error'])}",
                kind=ErrorKind.SERVER,
            )
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self.model = model
        timings = chunk.get("timings")
        if isinstance(timings, dict):
            numbers = _numbers(timings)
            if numbers:
                self.timings = numbers
        elif timings is not None:
            self._ignore("timings", timings)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if usage:
                self.usage = usage
        elif usage is not None:
            self._ignore("usage", usage)
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise EngineClientError(
                f"the server sent choices that are {_kind(choices)}, not a list", ErrorKind.PROTOCOL
            )
        for choice in choices:
            if not isinstance(choice, dict):
                raise EngineClientError(
                    f"the server sent a choice that is {_kind(choice)}, not an object",
                    ErrorKind.PROTOCOL,
                )
            text = _content_text(choice.get(part), part)
            calls = self._take_calls(choice.get(part), part)
            if (text or calls) and self.ttft_ms is None:
                self.ttft_ms = (self._clock() - self._started) * 1000.0
            if text:
                yield Delta(text)
            reason = choice.get("finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason

    def _take_calls(self, container: Any, part: str) -> bool:
        """Adds a delta's (or a message's) tool-call pieces; True when it had any.

        Streamed calls come as OpenAI sends them: the first piece of a call has
        its index, id and name, later pieces add fragments of the arguments.
        A whole message's calls are complete pieces at indexes 0, 1, ...
        """
        if not isinstance(container, dict):
            return False
        calls = container.get("tool_calls")
        if calls is None:
            return False
        if not isinstance(calls, list):
            raise EngineClientError(
                f"the server sent {part}.tool_calls that is {_kind(calls)}, not a list",
                ErrorKind.PROTOCOL,
            )
        for position, piece in enumerate(calls):
            if not isinstance(piece, dict):
                raise EngineClientError(
                    f"the server sent a tool call that is {_kind(piece)}, not an object",
                    ErrorKind.PROTOCOL,
                )
            index = piece.get("index", position) if part == "delta" else position
            if not isinstance(index, int) or isinstance(index, bool):
                raise EngineClientError(
                    "the server sent a tool call without a numeric index", ErrorKind.PROTOCOL
                )
            self._calls.setdefault(index, _CallParts()).add(piece)
        return bool(calls)

    def _ignore(self, name: str, value: Any) -> None:
        # Figures are extras: a malformed one is dropped, not a reason to lose the answer.
        if name not in self._ignored:
            self._ignored.add(name)
            log.warning("ignoring the server's %s: %s, not an object", name, _kind(value))


class _CallParts:
    """One tool call as its pieces arrive."""

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments = ""

    def add(self, piece: dict[str, Any]) -> None:
        if isinstance(piece.get("id"), str) and piece["id"]:
            self.id = piece["id"]
        function = piece.get("function")
        if not isinstance(function, dict):
            return
        # Names come whole in one piece (OpenAI, Peregrine); some servers split
        # them, and the openai client joins them, so they are joined here too.
        if isinstance(function.get("name"), str):
            self.name += function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            self.arguments += arguments
        elif isinstance(arguments, dict):  # a server that sends an object, not JSON text
            self.arguments += json.dumps(arguments)

    def as_call(self) -> dict[str, Any]:
        return {
            # A result names its call by id; a server that sent none gets one made up.
            "id": self.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments or "{}"},
        }


def _numbers(figures: dict[str, Any]) -> dict[str, Any]:
    """Only the finite numbers: callers do arithmetic on timings."""
    return {
        str(k): v
        for k, v in figures.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _content_text(container: Any, part: str) -> str:
    """The text in a delta or message; a list of content parts is joined."""
    if container is None:
        return ""
    if not isinstance(container, dict):
        raise EngineClientError(
            f"the server sent a {part} that is {_kind(container)}, not an object",
            ErrorKind.PROTOCOL,
        )
    content = container.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        # Some servers send content parts; only text parts belong in the answer.
        texts = []
        for item in content:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and item.get("type", "text") == "text":
                text = item.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return "".join(texts)
    raise EngineClientError(
        f"the server sent {part}.content that is {_kind(content)}, not text", ErrorKind.PROTOCOL
    )


def _kind(value: Any) -> str:
    """A JSON value's type in words, for protocol errors."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:200]


def _json_chunks(payload: str) -> list[dict[str, Any]]:
    """The chunks in one event's data: normally one; one per line from servers that
    put several chunks into one event without blank lines between them."""
    try:
        return [_json_object(json.loads(payload))]
    except (ValueError, RecursionError) as exc:
        lines = [line for line in payload.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                return [_json_object(json.loads(line)) for line in lines]
            except (ValueError, RecursionError):
                pass  # the error below names the payload as a whole
        raise EngineClientError(
            f"the server sent a stream chunk that is not JSON: {payload[:80]!r}",
            kind=ErrorKind.PROTOCOL,
        ) from exc


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EngineClientError(
            "the server sent a stream chunk that is not an object", ErrorKind.PROTOCOL
        )
    return value


def _json_body(content: bytes, what: str) -> Any:
    """A response body as JSON, or a protocol error naming what it should have been."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as exc:
        raise EngineClientError(
            f"the server's {what} is not JSON: {content[:80]!r}", kind=ErrorKind.PROTOCOL
        ) from exc


def _event_error(payload: str) -> str:
    """The message of an SSE "event: error", JSON or plain text."""
    try:
        message = _error_message(json.loads(payload))
    except (ValueError, RecursionError):
        message = ""
    return message or payload[:200]


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return ""


# What servers say for a path they do not serve; the hint about the API root helps more.
_GENERIC_NOT_FOUND = {"not found", "file not found", "404 not found", "404 page not found"}


def _http_error(response: httpx.Response, endpoint: Endpoint) -> EngineClientError:
    status = response.status_code
    if _media_type(response) == "text/html":
        message = ""  # an error page's markup is no message for a person
    else:
        try:
            message = _error_message(json.loads(response.content))
        except (ValueError, RecursionError):
            message = response.text.strip()[:200]
    if status in (401, 403):
        said = f": {message}" if message else ""
        return EngineClientError(
            f"the server at {endpoint.api_root} refused the API key ({status}{said})",
            ErrorKind.AUTH,
            status,
        )
    if status == 404:
        if message and message.strip(" .").lower() not in _GENERIC_NOT_FOUND:
            # An OpenAI-compatible server naming what is missing, e.g. an unknown model.
            return EngineClientError(
                f"{message} (the server at {endpoint.api_root} answered 404)",
                ErrorKind.REQUEST,
                status,
            )
        return EngineClientError(
            f"{endpoint.api_root} has no OpenAI-compatible API here (404)",
            ErrorKind.REQUEST,
            status,
        )
    kind = ErrorKind.SERVER if status >= 500 else ErrorKind.REQUEST
    return EngineClientError(message or f"the server answered HTTP {status}", kind, status)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__
