"""A Qt-free client for any OpenAI-compatible server: Peregrine's engine or another.

Streams chat completions over SSE and yields plain data. It blocks while it
reads, so the app runs it on a worker thread; `CancelToken.cancel()` may be
called from any other thread and stops the stream within one token (the
connection is shut down, which also stops generation on the server).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx

from engine.errors import PeregrineError

log = logging.getLogger(__name__)


class EngineClientError(PeregrineError):
    """A request that failed, in words a user can act on."""

    def __init__(self, message: str, kind: str = "request", status: int | None = None) -> None:
        super().__init__(message)
        # connect | auth | request | server | lost | protocol
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


StreamEvent = Delta | Finished


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
            # shutdown (not close) wakes a thread blocked in recv on this socket.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:
                log.debug("socket already closed while cancelling: %s", exc)

    def _attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock


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
        self._http = httpx.Client(
            base_url=endpoint.api_root,
            headers=headers,
            transport=transport,
            # A big prompt can take minutes before the first token; connect fails fast.
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
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
        messages: list[dict[str, str]],
        params: dict[str, Any] | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[StreamEvent]:
        """Yields Delta per token and one Finished last; raises EngineClientError."""
        cancel = cancel or CancelToken()
        body: dict[str, Any] = {**(params or {}), "messages": messages, "stream": True}
        if self.endpoint.model and "model" not in body:
            body["model"] = self.endpoint.model
        started = self._clock()
        ttft_ms: float | None = None
        finish_reason = ""
        timings: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        model = ""
        try:
            with self._http.stream("POST", "/chat/completions", json=body) as response:
                cancel._attach(_socket_of(response))
                if cancel.cancelled:
                    yield Finished("cancelled", ttft_ms=None)
                    return
                if response.status_code != 200:
                    response.read()
                    raise _http_error(response, self.endpoint)
                for line in response.iter_lines():
                    if cancel.cancelled:
                        break
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        yield Finished(finish_reason or "stop", timings, usage, ttft_ms, model)
                        return
                    chunk = _json_chunk(payload)
                    if "error" in chunk:
                        raise EngineClientError(_error_message(chunk), kind="server")
                    model = chunk.get("model") or model
                    timings = chunk.get("timings") or timings
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if ttft_ms is None:
                                ttft_ms = (self._clock() - started) * 1000.0
                            yield Delta(text)
                        finish_reason = choice.get("finish_reason") or finish_reason
        except httpx.ConnectError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind="connect",
            ) from exc
        except httpx.TimeoutException as exc:
            raise EngineClientError(
                f"the server at {self.endpoint.api_root} stopped answering (timed out)",
                kind="lost",
            ) from exc
        except (httpx.TransportError, OSError) as exc:
            if not cancel.cancelled:
                raise EngineClientError(
                    "the connection to the server was lost in the middle of the answer",
                    kind="lost",
                ) from exc
        finally:
            cancel._attach(None)
        if cancel.cancelled:
            yield Finished("cancelled", timings, usage, ttft_ms, model)
            return
        raise EngineClientError(
            "the connection to the server was lost in the middle of the answer", kind="lost"
        )

    def status(self) -> dict[str, Any] | None:
        """Peregrine's /v1/engine/status, or None for servers that do not have it."""
        try:
            response = self._http.get("/engine/status", timeout=5.0)
        except httpx.HTTPError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind="connect",
            ) from exc
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            raise _http_error(response, self.endpoint)
        data = response.json()
        return data if isinstance(data, dict) else None

    def models(self) -> list[str]:
        """The model ids the server offers."""
        try:
            response = self._http.get("/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise EngineClientError(
                f"cannot reach the server at {self.endpoint.api_root} ({_reason(exc)})",
                kind="connect",
            ) from exc
        if response.status_code != 200:
            raise _http_error(response, self.endpoint)
        data = response.json()
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    try:
        sock = stream.get_extra_info("socket")
    except Exception as exc:  # transports differ; cancelling then waits for the next token
        log.debug("no socket for cancellation: %s", exc)
        return None
    return sock if isinstance(sock, socket.socket) else None


def _json_chunk(payload: str) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise EngineClientError(
            f"the server sent a stream chunk that is not JSON: {payload[:80]!r}", kind="protocol"
        ) from exc
    if not isinstance(chunk, dict):
        raise EngineClientError("the server sent a stream chunk that is not an object", "protocol")
    return chunk


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


def _http_error(response: httpx.Response, endpoint: Endpoint) -> EngineClientError:
    try:
        message = _error_message(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        message = response.text.strip()[:200]
    status = response.status_code
    if status in (401, 403):
        return EngineClientError(
            f"the server at {endpoint.api_root} refused the API key ({status})", "auth", status
        )
    if status == 404:
        return EngineClientError(
            f"{endpoint.api_root} has no OpenAI-compatible API here (404)", "request", status
        )
    kind = "server" if status >= 500 else "request"
    return EngineClientError(message or f"the server answered HTTP {status}", kind, status)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__
