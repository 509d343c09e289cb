"""The engine's HTTP API: OpenAI-compatible routes plus engine control (docs/api.md).

aiohttp serves on the event loop; generation runs on the engine's decode
thread, and tokens come back through `loop.call_soon_threadsafe` into a
per-request asyncio queue. A client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import ValidationError

from engine.backend.llama import ContextFull, DecodeError, SamplingParams
from engine.decoding.request import GenerationResult, SpecParams, TokenLogprob
from engine.errors import PeregrineError
from engine.gguf.chat_template import TemplateError
from engine.serving import messages_api
from engine.serving.messages_api import error_body
from engine.serving.scheduler import (
    BadRequest,
    Done,
    Engine,
    Job,
    JobEvent,
    NotReady,
    PromptSpec,
    PromptTooLong,
    QueueFull,
    Started,
    TextDelta,
)
from engine.structured.constraint import GrammarError
from engine.structured.schema import SchemaError, grammar_for
from engine.tools.formats import ToolFormat
from engine.tools.parse import (
    ArgsDelta,
    CallStart,
    ContentDelta,
    ParseEvent,
    ReasoningDelta,
    StreamParser,
    ToolCall,
    collect,
    parse_output,
)
from engine.tools.request import ToolRequest, ToolRequestError, from_openai, openai_messages
from engine.wire.anthropic import CountTokensRequest, MessagesRequest
from engine.wire.control import LoadRequest
from engine.wire.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    refused_field,
)

log = logging.getLogger("peregrine.server")

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
MAX_BODY = 32 << 20
# llama-server's `--timeout` default: how long a client may stall a body read or a stream write.
DEFAULT_IO_TIMEOUT = 600.0
# What a stream may leave unread: the socket's send buffer (the kernel doubles
# it) plus our own backlog. Enough for a slow network, small enough that a
# client that stopped reading is noticed within a few hundred tokens.
STREAM_SOCKET_BUFFER = 8 << 10
STREAM_BACKLOG = 4 << 10
# `X-Peregrine-Client: app` marks the desktop app's own requests (docs/api.md).
CLIENT_HEADER = "X-Peregrine-Client"
_Req = TypeVar("_Req", bound=SamplingFields)
_AReq = TypeVar("_AReq", bound=CountTokensRequest)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        # Close the connection after answering: the body was not read to its end.
        self.close = close

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def response(self, *, anthropic: bool = False) -> web.Response:
        body = error_body(self.status, self.message) if anthropic else self.body()
        response = _ErrorResponse(self, body)
        if self.close:
            response.force_close()  # no keep-alive: the connection is mid-body
        return response


class _ErrorResponse(web.Response):
    """An error answer that remembers its error (re-shaped for Anthropic's routes)."""

    def __init__(self, error: ApiError, body: dict[str, Any]) -> None:
        super().__init__(
            text=json.dumps(body), status=error.status, content_type="application/json"
        )
        self.error = error


@dataclass
class ServerConfig:
    api_key: str
    host: str = "127.0.0.1"
    allowed_hosts: set[str] = field(default_factory=set)
    # Seconds a client may stall: sending its body, or reading a stream. A
    # stalled stream reader gets its generation cancelled and its connection closed.
    io_timeout: float = DEFAULT_IO_TIMEOUT
    # Folders (and single files) `/v1/engine/load` may load from, compared by
    # real path; None: anywhere (an engine on loopback).
    load_roots: Sequence[Path] | None = None


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "peregrine"}


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def build_app(engine: Engine, config: ServerConfig) -> web.Application:
    allowed = {h.lower() for h in LOOPBACK_HOSTS | config.allowed_hosts | {config.host}}

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await _guarded(request, handler)
        if request.path.startswith("/v1/messages") and isinstance(response, _ErrorResponse):
            # Anthropic's routes answer errors in Anthropic's shape.
            return response.error.response(anthropic=True)
        return response

    async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None and _host_name(host) not in allowed:
            return ApiError(
                403,
                f"host {host!r} is not allowed",
                type_="permission_error",
                code="host_not_allowed",
            ).response()
        if request.path != "/health":
            auth = request.headers.get("Authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            # Anthropic's clients send the key as x-api-key.
            token = token or request.headers.get("x-api-key", "").strip()
            # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as bytes.
            sent = token.encode("utf-8", "surrogateescape")
            if not token or not hmac.compare_digest(
                sent, config.api_key.encode("utf-8", "surrogateescape")
            ):
                return ApiError(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer <key>' or 'x-api-key')",
                    type_="authentication_error",
                    code="invalid_api_key",
                ).response()
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status >= 400:
                return ApiError(
                    exc.status, exc.reason, code=exc.reason.lower().replace(" ", "_")
                ).response()
            raise
        except ConnectionError:
            # The client is gone: there is nobody to answer, and nothing to log.
            return ApiError(
                499, "the client closed the connection", code="client_closed"
            ).response()
        except Exception as exc:
            # Keep the OpenAI error shape even for our own bugs; the traceback goes to the log.
            log.exception("unhandled error in %s %s", request.method, request.path)
            return ApiError(
                500,
                f"internal error: {type(exc).__name__}",
                type_="server_error",
                code="internal_error",
            ).response()

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    api = _Api(engine, io_timeout=config.io_timeout, load_roots=config.load_roots)
    # Stopping the server cancels every generation in flight, so that open
    # streams end at once instead of holding the shutdown until they finish.
    app.on_shutdown.append(api.cancel_all)
    app.router.add_get("/health", api.health)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model:.+}", api.model)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/embeddings", api.embeddings)
    app.router.add_post("/v1/messages", api.messages)
    app.router.add_post("/v1/messages/count_tokens", api.count_tokens)
    app.router.add_post("/v1/engine/load", api.load)
    app.router.add_post("/v1/engine/unload", api.unload)
    app.router.add_get("/v1/engine/status", api.status)
    return app


def make_runner(app: web.Application, config: ServerConfig) -> web.AppRunner:
    """The runner to serve `build_app`'s app with: the timeouts and limits it relies on."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # Open streams are cancelled on shutdown (`cancel_all`), so handlers end
        # fast; this only bounds the wait for a stuck one.
        shutdown_timeout=1.5,
        # Also closes connections that send nothing, or never finish their headers.
        keepalive_timeout=min(config.io_timeout, 75.0),
        # After an early answer (408, 413) aiohttp reads what is left of the body
        # before closing; from a stalled client that never comes.
        lingering_time=min(config.io_timeout, 10.0),
        # aiohttp would inflate a gzip body as it arrives, before any size check:
        # 1 MB of gzip became 460 MB of memory. `_decoded` inflates with a bound.
        auto_decompress=False,
    )


async def _json_body(request: web.Request, timeout: float) -> dict[str, Any]:
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413, "the request body is too large", code="request_too_large", close=True
        ) from exc
    except TimeoutError as exc:
        raise ApiError(
            408, "the request body did not arrive in time", code="request_timeout", close=True
        ) from exc
    raw = _decoded(raw, request.headers.get("Content-Encoding", ""))
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # from _not_json
        raise ApiError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _decoded(raw: bytes, encoding: str) -> bytes:
    """The body with its Content-Encoding undone, refused beyond MAX_BODY (a zip bomb)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ApiError(
            415,
            f"Content-Encoding {encoding!r} is not supported (send gzip, deflate or none)",
            code="unsupported_encoding",
        )
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # a gzip or a zlib header
    try:
        out = inflater.decompress(raw, MAX_BODY + 1)
    except zlib.error as exc:
        raise ApiError(
            400, f"the request body is not valid {encoding}: {exc}", code="invalid_body"
        ) from exc
    if len(out) > MAX_BODY:
        raise ApiError(413, "the request body is too large", code="request_too_large")
    return out


def _not_json(name: str) -> float:
    """Refuses NaN and Infinity: Python's JSON reader takes them, JSON does not (nor do our answers' readers)."""
    raise ValueError(f"{name} is not a JSON number")


def _fold_flat_keys(body: dict[str, Any]) -> dict[str, Any]:
    """Accepts llama-server's flat `"speculative.n_max": 8` keys, and null for "the default".

    OpenAI's API takes null for every optional parameter (`"stream": null`),
    and some clients send it; a missing key means the same here.
    """
    body = {k: v for k, v in body.items() if v is not None}
    flat = {k.split(".", 1)[1]: v for k, v in body.items() if k.startswith("speculative.")}
    if not flat:
        return body
    nested = (
        dict(body.get("speculative") or {}) if isinstance(body.get("speculative"), dict) else {}
    )
    nested.update(flat)
    return {**body, "speculative": nested}


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
    param = str(err["loc"][0]) if err["loc"] else None
    return ApiError(
        400, f"invalid value for '{loc}': {err['msg']}", code="invalid_value", param=param
    )


def _logit_bias(req: SamplingFields) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}`, checked: ids are non-negative integers, biases in [-100, 100]."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or key.strip() != str(token):
            raise ApiError(
                400,
                f"'logit_bias' keys must be token ids, not {key[:40]!r}",
                code="invalid_value",
                param="logit_bias",
            )
        if not -100.0 <= bias <= 100.0:
            raise ApiError(
                400,
                f"'logit_bias' values must be between -100 and 100 (token {token}: {bias})",
                code="invalid_value",
                param="logit_bias",
            )
        pairs.append((token, float(bias)))
    if len(pairs) > 1024:
        raise ApiError(
            400, "'logit_bias' takes at most 1024 tokens", code="invalid_value", param="logit_bias"
        )
    return tuple(pairs)


def _sampling(req: SamplingFields) -> SamplingParams:
    d = SamplingParams()
    return SamplingParams(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_k=d.top_k if req.top_k is None else req.top_k,
        top_p=d.top_p if req.top_p is None else req.top_p,
        min_p=d.min_p if req.min_p is None else req.min_p,
        repeat_penalty=d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
        repeat_last_n=d.repeat_last_n if req.repeat_last_n is None else req.repeat_last_n,
        frequency_penalty=d.frequency_penalty
        if req.frequency_penalty is None
        else req.frequency_penalty,
        presence_penalty=d.presence_penalty
        if req.presence_penalty is None
        else req.presence_penalty,
        seed=req.seed,
        logit_bias=_logit_bias(req),
    )


def _require_utf8(text: str | None, param: str) -> None:
    """Rejects lone surrogates (JSON `"\\ud800"`): they cannot be encoded for the tokenizer."""
    if not text:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            f"'{param}' contains an invalid Unicode code point (a lone surrogate) at position {exc.start}",
            code="invalid_value",
            param=param,
        ) from exc


def _check_common(
    req: SamplingFields, *, drafters: Sequence[str] = (), mtp_reason: str | None = None
) -> None:
    if (
        isinstance(req, ChatCompletionRequest)
        and req.top_logprobs is not None
        and req.top_logprobs > 0
        and not req.logprobs
    ):
        raise ApiError(
            400,
            "'top_logprobs' needs 'logprobs': true",
            code="invalid_value",
            param="top_logprobs",
        )
    max_tokens = req.requested_max_tokens()
    if max_tokens is not None and max_tokens < 1:
        field_name = (
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        )
        raise ApiError(
            400, f"'{field_name}' must be at least 1", code="invalid_value", param=field_name
        )
    stops = req.stop_list()
    if len(stops) > 16:
        raise ApiError(400, "'stop' takes at most 16 sequences", code="invalid_value", param="stop")
    for stop in stops:
        _require_utf8(stop, "stop")
    spec = req.speculative
    if spec is not None and spec.type == "mtp" and "mtp" not in drafters:
        raise ApiError(
            400,
            "speculative type 'mtp' is not available: "
            + (mtp_reason or "the model has no MTP heads"),
            code="unsupported_value",
            param="speculative.type",
        )
    if spec is not None and spec.type == "draft" and "draft" not in drafters:
        raise ApiError(
            400,
            "speculative type 'draft' needs a draft model: start the engine with --draft-model",
            code="unsupported_value",
            param="speculative.type",
        )


class _Mailbox:
    """Hands events from the decode thread to the event loop, waking it once per batch.

    Waking the loop is a write to its self-pipe: a system call, and on a
    busy CPU a context switch. A step of several slots sends several events,
    and the loop may still be writing the last ones: all that arrive before
    it drains share one wake-up (the profile's largest cost per token besides
    llama_decode, docs/benchmarks.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._events: list[tuple[asyncio.Queue[JobEvent], JobEvent]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[JobEvent], event: JobEvent) -> None:
        with self._lock:
            self._events.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            # The event loop has closed (shutdown cut a slow request off): nobody
            # waits for these events, and raising would only break the decode thread's job.
            log.debug("dropped %s event(s) for requests that outlived the server", event)

    def _drain(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            self._scheduled = False
        for queue, event in events:
            queue.put_nowait(event)


async def _open_sse(request: web.Request) -> web.StreamResponse:
    """A prepared server-sent-events response (no caching, no proxy buffering)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


class _Stream:
    """Carries one job's events from the decode thread to the request's coroutine."""

    def __init__(self, mailbox: _Mailbox) -> None:
        self.mailbox = mailbox
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue()

    def put(self, event: JobEvent) -> None:
        self.mailbox.post(self.queue, event)


class _Api:
    def __init__(
        self,
        engine: Engine,
        *,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        load_roots: Sequence[Path] | None = None,
    ) -> None:
        self.engine = engine
        self._mailbox: _Mailbox | None = None
        self.io_timeout = io_timeout
        self.load_roots = (
            None if load_roots is None else [Path(os.path.realpath(r)) for r in load_roots]
        )
        self.jobs: dict[int, Job] = {}  # submitted and not yet answered, by id()

    async def cancel_all(self, _app: web.Application | None = None) -> None:
        """Cancels every generation in flight (server shutdown)."""
        if self.jobs:
            log.info("cancelling %d open request(s)", len(self.jobs))
        for job in list(self.jobs.values()):
            job.cancel.set()

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": self.engine.health()})

    def _new_stream(self) -> _Stream:
        """A stream for one job, posting through the running loop's mailbox."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return _Stream(self._mailbox)

    def _model(self, model_id: str) -> dict[str, Any]:
        """OpenAI's model object, with the tool-call format and its self-test (docs/api.md)."""
        tools = self.engine.status().tool_format
        extra = {"tool_format": tools.model_dump(mode="json")} if tools is not None else {}
        return {**_model_object(model_id), **extra}

    async def models(self, request: web.Request) -> web.Response:
        model_id = self.engine.model_id
        data = [self._model(model_id)] if model_id else []
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """OpenAI's retrieve-model route (`client.models.retrieve(id)`)."""
        wanted = request.match_info["model"]
        model_id = self.engine.model_id
        if not model_id or wanted != model_id:
            raise ApiError(
                404,
                f"the model {wanted!r} is not loaded"
                + (f" (the loaded model is {model_id!r})" if model_id else ""),
                code="model_not_found",
                param="model",
            )
        return web.json_response(self._model(model_id))

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.status().model_dump(mode="json"))

    async def load(self, request: web.Request) -> web.Response:
        body = await _json_body(request, self.io_timeout)
        try:
            load = LoadRequest.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        for name, path in (("model", load.model), ("draft_model", load.draft_model)):
            if path is not None and path != "auto" and not self._may_load(path):
                # The same answer whether or not the file exists: nothing is revealed.
                raise ApiError(
                    403,
                    f"'{name}' must be a file under the engine's models folders "
                    "(an engine listening beyond loopback loads nothing else)",
                    type_="permission_error",
                    code="path_not_allowed",
                    param=name,
                )
        self.engine.load(load)
        return web.json_response({"status": "loading", "model": load.model}, status=202)

    def _may_load(self, path: str) -> bool:
        """Whether `path`, symlinks resolved, lies inside a load root (always on loopback)."""
        if self.load_roots is None:
            return True
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError):
            return False
        return any(real == root or real.is_relative_to(root) for root in self.load_roots)

    async def embeddings(self, request: web.Request) -> web.Response:
        raise ApiError(
            400,
            "embeddings are not supported: this engine serves chat and text completions only",
            code="unsupported_endpoint",
        )

    async def unload(self, request: web.Request) -> web.Response:
        done = self.engine.unload()
        finished = await asyncio.get_running_loop().run_in_executor(None, done.wait, 30)
        if not finished:
            # Queued behind generations still running: it happens when they end.
            return web.json_response({"status": "unloading"}, status=202)
        return web.json_response({"status": "idle"})

    async def _parse(
        self, request: web.Request, model: type[_Req], route: Literal["chat", "completions"]
    ) -> tuple[_Req, str | None]:
        """Reads, validates and checks a completion request body (400 on any fault).

        Returns the request and the grammar its response_format compiles to.
        """
        body = _fold_flat_keys(await _json_body(request, self.io_timeout))
        refused = refused_field(body, route)
        if refused is not None:
            raise ApiError(400, refused[1], code="unsupported_value", param=refused[0])
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from exc
        _check_common(
            req, drafters=self.engine.drafter_names, mtp_reason=self.engine.mtp_unavailable
        )
        grammar = None
        if req.response_format is not None:
            fmt = req.response_format.as_dict()
            try:
                # Compiling a large schema takes a while: off the event loop.
                grammar = await asyncio.get_running_loop().run_in_executor(None, grammar_for, fmt)
            except SchemaError as exc:
                raise ApiError(400, str(exc), code="unsupported_schema", param=exc.param) from exc
        return req, grammar

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req, grammar = await self._parse(request, ChatCompletionRequest, "chat")
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                for part in m.content:
                    if part.type != "text":
                        # Answering without the image/audio/file would silently mislead the user.
                        raise ApiError(
                            400,
                            f"content part type '{part.type}' is not supported: this engine reads text only",
                            code="unsupported_value",
                            param=f"messages.{i}.content",
                        )
            _require_utf8(m.text(), f"messages.{i}.content")
            _require_utf8(m.name, f"messages.{i}.name")
        try:
            tools = from_openai(req)
            messages = openai_messages(req.messages)
        except ToolRequestError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param=exc.param) from exc
        if tools is not None and tools.mode != "none" and grammar is not None:
            raise ApiError(
                400,
                "'response_format' and 'tools' cannot be combined (a tool's parameters "
                "already constrain its call)",
                code="unsupported_value",
                param="response_format",
            )
        parsing, tool_grammar = await self._tools(
            tools, legacy=bool(req.functions) and not req.tools
        )
        return await self._run(
            request,
            req,
            PromptSpec(messages=messages, tools=tools.template_tools() if tools else None),
            tool_grammar or grammar,
            req.requested_logprobs(),
            chat=True,
            parsing=parsing,
        )

    # --- Anthropic's Messages API (engine/serving/messages_api.py) -----------------

    async def _anthropic_body(self, request: web.Request, model: type[_AReq]) -> _AReq:
        body = {
            k: v for k, v in (await _json_body(request, self.io_timeout)).items() if v is not None
        }
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from exc

    def _anthropic_prompt(self, req: CountTokensRequest) -> tuple[PromptSpec, ToolRequest | None]:
        try:
            messages = messages_api.chat_messages(req)
            tools = messages_api.tools_of(req)
        except ToolRequestError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param=exc.param) from exc
        for i, m in enumerate(messages):
            _require_utf8(m.get("content"), f"messages.{i}.content")
        return PromptSpec(messages=messages, tools=tools.template_tools() if tools else None), tools

    async def count_tokens(self, request: web.Request) -> web.Response:
        """`POST /v1/messages/count_tokens`: the prompt's size, as the model's template renders it."""
        req = await self._anthropic_body(request, CountTokensRequest)
        prompt, _tools = self._anthropic_prompt(req)
        try:
            n = await asyncio.get_running_loop().run_in_executor(
                None, self.engine.count_tokens, prompt
            )
        except (PeregrineError, TemplateError) as exc:
            raise _api_error_for(exc) from exc
        return web.json_response({"input_tokens": n})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/messages`: Anthropic's Messages API, streamed or not."""
        req = await self._anthropic_body(request, MessagesRequest)
        prompt, tools = self._anthropic_prompt(req)
        stops = req.stop_sequences or []
        if len(stops) > 16:
            raise ApiError(
                400,
                "'stop_sequences' takes at most 16",
                code="invalid_value",
                param="stop_sequences",
            )
        parsing, grammar = await self._tools(tools, force=True)
        assert parsing is not None
        d = SamplingParams()
        sampling = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_k=d.top_k if req.top_k is None else req.top_k,
            top_p=d.top_p if req.top_p is None else req.top_p,
        )
        stream = self._new_stream()
        job = Job(
            prompt=prompt,
            sampling=sampling,
            max_tokens=req.max_tokens,
            stop=stops,
            speculative=SpecParams(),
            emit=stream.put,
            grammar=grammar,
        )
        self._submit(job)
        msg_id = messages_api.message_id()
        model = req.model or self.engine.model_id or "unknown"
        try:
            started = await self._await_start(request, stream, job)
            parser = parsing.parser(started.reasoning_open, messages_api.tool_use_id)
            if req.stream:
                return await self._anthropic_stream(
                    request, stream, job, parser, msg_id, model, started.n_prompt
                )
            while True:
                event = await self._next(request, stream, job)
                if isinstance(event, Done):
                    if event.error is not None or event.result is None:
                        raise _api_error_for(event.error, "messages")
                    result = event.result
                    parsed = collect(parser.feed(result.text) + parser.finish())
                    return web.json_response(
                        messages_api.message_body(
                            msg_id=msg_id,
                            model=model,
                            parsed=parsed,
                            finish=result.finish_reason,
                            stop_sequence=result.stop_sequence,
                            input_tokens=started.n_prompt,
                            output_tokens=result.completion_tokens,
                        )
                    )
        finally:
            job.cancel.set()
            self.jobs.pop(id(job), None)

    async def _anthropic_stream(
        self,
        request: web.Request,
        stream: _Stream,
        job: Job,
        parser: StreamParser,
        msg_id: str,
        model: str,
        n_prompt: int,
    ) -> web.StreamResponse:
        response = await _open_sse(request)
        send = _Sender(request, response, job, self.io_timeout)
        blocks = messages_api.EventWriter()
        start = {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": n_prompt, "output_tokens": 0},
            },
        }
        try:
            await send.named("message_start", start)
            await send.named("ping", {"type": "ping"})
            while True:
                event = await self._next(request, stream, job)
                if isinstance(event, TextDelta):
                    for name, payload in blocks.feed(parser.feed(event.text)):
                        await send.named(name, payload)
                elif isinstance(event, Done):
                    result = event.result
                    if event.error is not None or result is None:
                        error = _api_error_for(event.error, "messages")
                        await send.named("error", error_body(error.status, error.message))
                        break
                    for name, payload in blocks.feed(parser.finish()) + blocks.finish():
                        await send.named(name, payload)
                    reason = messages_api.stop_reason(
                        result.finish_reason, bool(parser.calls), result.stop_sequence
                    )
                    await send.named(
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": result.stop_sequence},
                            "usage": {"output_tokens": result.completion_tokens},
                        },
                    )
                    await send.named("message_stop", {"type": "message_stop"})
                    break
            await asyncio.wait_for(response.write_eof(), self.io_timeout)
        except (ConnectionResetError, ConnectionError):
            job.cancel.set()
        except TimeoutError:
            send.give_up()
        return response

    def _submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            raise ApiError(503, str(exc), type_="server_error", code="queue_full") from exc
        except NotReady as exc:
            raise ApiError(503, str(exc), type_="server_error", code="model_not_ready") from exc
        self.jobs[id(job)] = job

    async def _tools(
        self, tools: ToolRequest | None, *, legacy: bool = False, force: bool = False
    ) -> tuple[_Parsing | None, str | None]:
        """How to read the answer (tool calls, reasoning) and the grammar its tool choice needs."""
        fmt = self.engine.tool_format
        if fmt is None:
            if tools is None:
                return None, None
            raise ApiError(503, "no model is loaded", type_="server_error", code="model_not_ready")
        grammar = None
        if tools is not None:
            try:
                grammar = await asyncio.get_running_loop().run_in_executor(None, tools.grammar, fmt)
            except SchemaError as exc:
                raise ApiError(400, str(exc), code="unsupported_schema", param=exc.param) from exc
        if tools is None and not fmt.reasoning and not force:
            return None, grammar
        return _Parsing(
            fmt, tools.schemas() if tools else None, legacy, grammar is not None
        ), grammar

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req, grammar = await self._parse(request, CompletionRequest, "completions")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            spec = PromptSpec(token_ids=[int(p) for p in prompt])
        elif isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(
                    400,
                    "'prompt' takes one string per request",
                    code="unsupported_value",
                    param="prompt",
                )
            spec = PromptSpec(text=str(prompt[0]))
        else:
            spec = PromptSpec(text=prompt)
        if spec.text == "" or spec.token_ids == []:
            raise ApiError(400, "'prompt' is empty", code="invalid_value", param="prompt")
        _require_utf8(spec.text, "prompt")
        return await self._run(request, req, spec, grammar, req.requested_logprobs(), chat=False)

    async def _run(
        self,
        request: web.Request,
        req: SamplingFields,
        prompt: PromptSpec,
        grammar: str | None,
        logprobs: int | None,
        *,
        chat: bool,
        parsing: _Parsing | None = None,
    ) -> web.StreamResponse:
        stream = self._new_stream()
        spec_opts = req.speculative
        job = Job(
            prompt=prompt,
            sampling=_sampling(req),
            max_tokens=req.requested_max_tokens(),
            stop=req.stop_list(),
            speculative=SpecParams(
                type=spec_opts.type,
                n_max=spec_opts.n_max,
                n_min=spec_opts.n_min,
                p_min=spec_opts.p_min,
            )
            if spec_opts
            else SpecParams(),
            emit=stream.put,
            grammar=grammar,
            top_logprobs=logprobs,
            # The desktop app marks its own chat, admitted ahead of queued API requests.
            priority="app" if request.headers.get(CLIENT_HEADER, "").lower() == "app" else "api",
        )
        self._submit(job)
        meta = _ResponseMeta(
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            created=int(time.time()),
            model=self.engine.model_id or "unknown",
            chat=chat,
            parsing=parsing,
        )
        try:
            if req.stream:
                return await self._stream(request, stream, job, meta, req)
            return await self._collect(request, stream, job, meta)
        finally:
            job.cancel.set()  # no-op when finished; stops work for a vanished client
            self.jobs.pop(id(job), None)

    async def _next(self, request: web.Request, stream: _Stream, job: Job) -> JobEvent:
        """The next event, cancelling the job if the client has gone away meanwhile."""
        while True:
            # Checked before every event, not only in quiet spells: a busy
            # generation (an event every few ms) must also notice a client that
            # left, or a non-streaming request would run to max_tokens for nobody.
            transport = request.transport
            if transport is None or transport.is_closing():
                job.cancel.set()
                raise ConnectionResetError("client disconnected")
            if not stream.queue.empty():
                return stream.queue.get_nowait()  # no timer for an event already there
            try:
                # A timeout scope, not wait_for: no task and no extra loop turn per token.
                async with asyncio.timeout(0.25):
                    return await stream.queue.get()
            except TimeoutError:
                continue

    async def _await_start(self, request: web.Request, stream: _Stream, job: Job) -> Started:
        """Waits for the job to start; returns its Started event or raises ApiError."""
        event = await self._next(request, stream, job)
        if isinstance(event, Done):
            raise _api_error_for(event.error, _prompt_field(job))
        assert isinstance(event, Started), event
        return event

    async def _collect(
        self, request: web.Request, stream: _Stream, job: Job, meta: _ResponseMeta
    ) -> web.Response:
        started = await self._await_start(request, stream, job)
        meta.reasoning_open = started.reasoning_open
        while True:
            event = await self._next(request, stream, job)
            if isinstance(event, Done):
                if event.error is not None or event.result is None:
                    raise _api_error_for(event.error, _prompt_field(job))
                return web.json_response(meta.full(event.result, started.n_prompt))

    async def _stream(
        self,
        request: web.Request,
        stream: _Stream,
        job: Job,
        meta: _ResponseMeta,
        req: SamplingFields,
    ) -> web.StreamResponse:
        started = await self._await_start(request, stream, job)
        n_prompt = started.n_prompt
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        response = await _open_sse(request)
        send = _Sender(request, response, job, self.io_timeout)
        try:
            if meta.chat:
                await send.event(meta.chunk({"role": "assistant", "content": ""}, None))
            offset = 0  # text_offset of the next chunk (completions' logprobs)
            parser = (
                meta.parsing.parser(started.reasoning_open) if meta.parsing is not None else None
            )
            while True:
                event = await self._next(request, stream, job)
                if isinstance(event, TextDelta) and parser is not None:
                    for chunk in meta.parsed_chunks(parser.feed(event.text)):
                        await send.event(chunk)
                elif isinstance(event, TextDelta):
                    text = event.text
                    lp = (
                        meta.logprobs(event.logprobs, offset)
                        if job.top_logprobs is not None
                        else None
                    )
                    await send.event(meta.chunk({"content": text} if meta.chat else text, None, lp))
                    offset += len(text)
                elif isinstance(event, Done):
                    result = event.result
                    if event.error is not None or result is None:
                        await send.event(_api_error_for(event.error, _prompt_field(job)).body())
                    else:
                        finish: str = result.finish_reason
                        if parser is not None:
                            for chunk in meta.parsed_chunks(parser.finish()):
                                await send.event(chunk)
                            finish = _finish_with_calls(
                                finish,
                                parser.calls,
                                meta.parsing is not None and meta.parsing.legacy,
                            )
                        final = meta.chunk({} if meta.chat else "", finish)
                        final["timings"] = result.timings.to_json()
                        usage = meta.usage(result, n_prompt)
                        if include_usage:
                            # OpenAI's shape: usage only on one more chunk, with no choices.
                            await send.event(final)
                            await send.event(
                                {**meta.chunk("", None), "choices": [], "usage": usage}
                            )
                        else:
                            final["usage"] = usage
                            await send.event(final)
                    await send.raw(b"data: [DONE]\n\n")
                    break
            await asyncio.wait_for(response.write_eof(), self.io_timeout)
        except (ConnectionResetError, ConnectionError):
            job.cancel.set()
        except TimeoutError:
            send.give_up()
        return response


class _Sender:
    """Writes SSE events, giving up on a client that stops reading.

    Left alone, the kernel would buffer megabytes for a client that keeps its
    connection open but never reads (thousands of tokens), and aiohttp's
    `write` then waits without a limit: the generation would run on for nobody
    and the request would never end. So a stream keeps only a small backlog,
    and a client that does not take it within the timeout is cut off.
    """

    def __init__(
        self, request: web.Request, response: web.StreamResponse, job: Job, timeout: float
    ) -> None:
        self.request = request
        self.response = response
        self.job = job
        self.timeout = timeout
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SOCKET_BUFFER)
            except OSError as exc:  # some platforms refuse; the timeout then just triggers later
                log.debug("could not shrink the stream's send buffer: %s", exc)

    async def event(self, payload: dict[str, Any]) -> None:
        await self.raw(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")

    async def named(self, name: str, payload: dict[str, Any]) -> None:
        """An SSE event with a name (Anthropic's streams)."""
        data = json.dumps(payload, ensure_ascii=False).encode()
        await self.raw(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n")

    async def raw(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._write(data)
        except TimeoutError:
            self.give_up()
            raise ConnectionResetError("the client stopped reading") from None

    async def _write(self, data: bytes) -> None:
        await self.response.write(data)
        # aiohttp only waits for the socket every 64 KiB written; check the backlog ourselves.
        transport = self.request.transport
        while transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size() <= STREAM_BACKLOG:
                return
            await asyncio.sleep(0.05)
        raise ConnectionResetError("the client went away")

    def give_up(self) -> None:
        log.warning("a client stopped reading its stream for %.0f s; cancelling it", self.timeout)
        self.job.cancel.set()
        transport = self.request.transport
        if transport is not None:
            transport.abort()  # close() would wait to flush what the client will never read


def _prompt_field(job: Job) -> str:
    """The request field that held the prompt, for `param` in errors."""
    return "messages" if job.prompt.messages is not None else "prompt"


def _api_error_for(error: BaseException | None, prompt_field: str = "messages") -> ApiError:
    if error is None:
        return ApiError(499, "the request was cancelled", code="cancelled")
    if isinstance(error, PromptTooLong):
        return ApiError(400, str(error), code="context_length_exceeded", param=prompt_field)
    if isinstance(error, NotReady):
        return ApiError(503, str(error), type_="server_error", code="model_not_ready")
    if isinstance(error, QueueFull):
        return ApiError(503, str(error), type_="server_error", code="queue_full")
    if isinstance(error, BadRequest):
        return ApiError(400, str(error), code="invalid_value", param=error.param)
    if isinstance(error, ContextFull):
        # The other requests filled the shared cache: retrying later may work.
        return ApiError(503, str(error), type_="server_error", code="context_full")
    if isinstance(error, DecodeError | GrammarError):
        # llama.cpp (or the grammar engine) failed, not the request.
        log.error("generation failed: %s", error)
        return ApiError(
            500, f"generation failed: {error}", type_="server_error", code="internal_error"
        )
    if isinstance(error, TemplateError):
        # The model's own template refused or overran its bounds: tell it apart
        # from a mistake in the request.
        return ApiError(400, str(error), code="chat_template_error", param="messages")
    if isinstance(error, PeregrineError):
        return ApiError(400, str(error), code="invalid_request")
    log.error("generation failed", exc_info=error)
    return ApiError(
        500,
        f"generation failed: {type(error).__name__}: {error}",
        type_="server_error",
        code="internal_error",
    )


@dataclass(frozen=True)
class _Parsing:
    """How a chat answer is read: the model's tool format, and the tools that may be called."""

    fmt: ToolFormat
    tools: dict[str, Any] | None  # None: no call is parsed (no tools, or tool_choice "none")
    # The request used the legacy `functions`: answer with `function_call` (the first call).
    legacy: bool = False
    # A grammar holds the calls: they stream as they are written (engine/tools/parse.py).
    grammar: bool = False

    def parser(
        self, in_reasoning: bool = False, new_id: Callable[[], str] | None = None
    ) -> StreamParser:
        return StreamParser(
            self.fmt, self.tools, in_reasoning=in_reasoning, new_id=new_id, grammar=self.grammar
        )


def _finish_with_calls(finish: str, calls: Sequence[ToolCall], legacy: bool = False) -> str:
    if not calls or finish != "stop":
        return finish
    return "function_call" if legacy else "tool_calls"


def _tool_call_json(index: int, call: ToolCall) -> dict[str, Any]:
    return {
        "index": index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


@dataclass
class _ResponseMeta:
    id: str
    created: int
    model: str
    chat: bool
    parsing: _Parsing | None = None
    reasoning_open: bool = False

    def parsed_chunks(self, events: Sequence[ParseEvent]) -> list[dict[str, Any]]:
        """Stream chunks for parsed events: content, reasoning_content, tool calls as they come.

        A call's first chunk has its id, type and name with "" arguments; each
        piece of its arguments follows in its own chunk (OpenAI's shape). The
        legacy `function_call` form carries the first call only.
        """
        chunks = []
        legacy = self.parsing is not None and self.parsing.legacy
        for e in events:
            if isinstance(e, ContentDelta):
                chunks.append(self.chunk({"content": e.text}, None))
            elif isinstance(e, ReasoningDelta):
                chunks.append(self.chunk({"reasoning_content": e.text}, None))
            elif legacy and isinstance(e, CallStart | ArgsDelta) and e.index == 0:
                fn = (
                    {"name": e.name, "arguments": ""}
                    if isinstance(e, CallStart)
                    else {"arguments": e.text}
                )
                chunks.append(self.chunk({"function_call": fn}, None))
            elif legacy:
                continue
            elif isinstance(e, CallStart):
                head = {
                    "index": e.index,
                    "id": e.id,
                    "type": "function",
                    "function": {"name": e.name, "arguments": ""},
                }
                chunks.append(self.chunk({"tool_calls": [head]}, None))
            elif isinstance(e, ArgsDelta):
                piece = {"index": e.index, "function": {"arguments": e.text}}
                chunks.append(self.chunk({"tool_calls": [piece]}, None))
        return chunks

    def chunk(
        self,
        delta: dict[str, Any] | str,
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            return self._envelope("chat.completion.chunk", {"delta": delta}, finish, logprobs)
        return self._envelope("text_completion", {"text": delta}, finish, logprobs)

    def _envelope(
        self,
        obj: str,
        content: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """OpenAI's object around one choice (its content: delta, message or text)."""
        choice = {"index": 0, **content, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    @staticmethod
    def usage(result: GenerationResult, n_prompt: int) -> dict[str, int]:
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": result.completion_tokens,
            "total_tokens": n_prompt + result.completion_tokens,
        }

    def logprobs(self, records: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        """OpenAI's logprobs object: chat's `content` list, or completions' legacy columns."""
        if self.chat:
            return {"content": [_chat_logprob(r) for r in records], "refusal": None}
        offsets = []
        for r in records:
            offsets.append(offset)
            offset += len(_text(r.piece))
        return {
            "tokens": [_text(r.piece) for r in records],
            "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{_text(t.piece): t.logprob for t in r.top} for r in records],
            "text_offset": offsets,
        }

    def full(self, result: GenerationResult, n_prompt: int) -> dict[str, Any]:
        lp = self.logprobs(result.logprobs) if result.logprobs is not None else None
        if self.chat and self.parsing is not None:
            parsed = parse_output(
                self.parsing.fmt,
                result.text,
                self.parsing.tools,
                in_reasoning=self.reasoning_open,
                grammar=self.parsing.grammar,
            )
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": parsed.content if parsed.content or not parsed.calls else None,
            }
            if parsed.reasoning is not None:
                msg["reasoning_content"] = parsed.reasoning
            legacy = self.parsing.legacy
            if parsed.calls and legacy:
                first = parsed.calls[0]
                msg["function_call"] = {"name": first.name, "arguments": first.arguments}
            elif parsed.calls:
                msg["tool_calls"] = [_tool_call_json(i, c) for i, c in enumerate(parsed.calls)]
                for call in msg["tool_calls"]:
                    del call["index"]
            finish = _finish_with_calls(result.finish_reason, parsed.calls, legacy)
            body = self._envelope("chat.completion", {"message": msg}, finish, lp)
        elif self.chat:
            message = {"message": {"role": "assistant", "content": result.text}}
            body = self._envelope("chat.completion", message, result.finish_reason, lp)
        else:
            body = self._envelope(
                "text_completion", {"text": result.text}, result.finish_reason, lp
            )
        return {
            **body,
            "usage": self.usage(result, n_prompt),
            "timings": result.timings.to_json(),
        }


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_logprob(record: TokenLogprob) -> dict[str, Any]:
    """One token of chat's `logprobs.content`: the sampled token first, then the top ones."""
    return {
        "token": _text(record.piece),
        "logprob": record.logprob,
        "bytes": list(record.piece),
        "top_logprobs": [
            {"token": _text(t.piece), "logprob": t.logprob, "bytes": list(t.piece)}
            for t in record.top
        ],
    }
