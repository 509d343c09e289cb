"""`peregrine serve`: the engine process (docs/api.md, "peregrine serve").

stdout carries only start-up events, one JSON object per line: `loading`
(zero or more), then exactly one `ready` or one `error` (then exit 1). Logs go
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from engine.errors import PeregrineError, UsageError
from engine.paths import Paths
from engine.runtimes import RuntimeSelector, Selection, activate
from engine.wire.control import AUTO_PARALLEL, DEFAULT_QUEUE_LIMIT, LoadRequest

log = logging.getLogger("peregrine.serve")

KV_CHOICES = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]

# Chat templates come from downloaded files and run in jinja2's sandbox: older
# releases let a template escape it (CVE-2024-56326, CVE-2025-27516).
MIN_JINJA2 = (3, 1, 6)


class EventWriter:
    """Writes start-up events to stdout, one JSON line each, flushed at once."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._last_progress = -1.0

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._out.write(json.dumps({"event": event, **fields}) + "\n")
            self._out.flush()

    def progress(self, value: float) -> None:
        # At most ~20 loading events per load.
        if value - self._last_progress >= 0.05 or (value >= 1.0 > self._last_progress):
            self._last_progress = value
            self.emit("loading", progress=round(min(max(value, 0.0), 1.0), 3))


class QuietBadRequests(logging.Filter):
    """Logs a malformed request from a client as one line instead of a traceback.

    aiohttp logs every unparsable request (a wrong method, broken headers) with
    a full traceback at ERROR: any client could fill the log with noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            lines = [line.strip() for line in str(exc.message).splitlines() if line.strip()]
            record.msg = "bad request from a client: %s %s"
            record.args = (exc.code, lines[0] if lines else type(exc).__name__)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peregrine serve",
        description="Run the engine: an OpenAI-compatible HTTP server for one GGUF model. "
        "stdout carries JSON start-up events (loading, then ready or error); logs go to stderr.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="GGUF file to serve (default: the built-in model)")
    g.add_argument(
        "--draft-model",
        help="GGUF of a small draft model for speculative decoding, or 'auto': a small "
        "library model with the same vocabulary, kept if it measures a gain",
    )
    g.add_argument(
        "--no-mtp",
        dest="mtp",
        action="store_false",
        help="don't load the model's multi-token-prediction (MTP) heads",
    )
    g.add_argument(
        "--chat-template-file",
        help="Jinja chat template to use instead of the model's own (llama-server's flag)",
    )
    g.add_argument(
        "--tool-self-test",
        choices=["on", "off"],
        default="on",
        help="after each load, make one forced tool call in idle time and report it (default on)",
    )
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=0, help="port, 0 for a free one (default 0)")
    g.add_argument(
        "--api-key", default=None, help="bearer key (env PEREGRINE_API_KEY; default: random)"
    )
    g.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra Host header name to accept (repeatable)",
    )
    g.add_argument(
        "--models-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="with --host beyond loopback, /v1/engine/load loads only files under the "
        "models folder and these folders (repeatable)",
    )
    g.add_argument(
        "--timeout",
        "-to",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long a client may stall sending a request or reading a stream "
        "before its connection is closed (default 600)",
    )
    g = p.add_argument_group("memory")
    g.add_argument("--ctx", "-c", type=int, default=None, help="context length in tokens")
    g.add_argument("--gpu-layers", "-ngl", type=int, default=None, help="layers on the GPU, -1 all")
    g.add_argument("--cache-type-k", "-ctk", choices=KV_CHOICES, default=None)
    g.add_argument("--cache-type-v", "-ctv", choices=KV_CHOICES, default=None)
    g.add_argument("--flash-attn", "-fa", choices=["on", "off", "auto"], default=None)
    g.add_argument("--threads", "-t", type=int, default=None)
    g.add_argument(
        "--tensor-split", "-ts", default=None, help="share of each GPU, comma-separated: 3,1"
    )
    g.add_argument(
        "--n-cpu-moe",
        "-ncmoe",
        type=int,
        default=None,
        help="MoE experts of the first N layers in RAM",
    )
    g.add_argument("--cpu-moe", "-cmoe", action="store_true", help="every MoE expert in RAM")
    g.add_argument("--batch-size", "-b", type=int, default=None, help="n_batch")
    g.add_argument("--ubatch-size", "-ub", type=int, default=None, help="n_ubatch")
    g.add_argument(
        "--cache-ram",
        type=int,
        default=1024,
        help="MiB for saved KV states of recent chats (default 1024, 0 off)",
    )
    g.add_argument(
        "--queue-limit",
        type=int,
        default=DEFAULT_QUEUE_LIMIT,
        help=f"requests allowed to wait for a slot (default {DEFAULT_QUEUE_LIMIT})",
    )
    g.add_argument(
        "--parallel",
        "-np",
        default=None,
        metavar="N|auto",
        help="requests decoded at once, one slot each (default auto: 4 slots sharing "
        "one KV cache of --ctx cells)",
    )
    g.add_argument(
        "--kv-unified",
        "-kvu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one KV cache shared by every slot, so a request may use the whole context "
        "(default); --no-kv-unified gives each slot ctx/N cells of its own",
    )
    g = p.add_argument_group("plan and runtime")
    g.add_argument(
        "--plan",
        choices=["auto", "none"],
        default="none",
        help="auto: let the memory planner pick settings not given explicitly",
    )
    g.add_argument("--runtime", default=None, help="engine runtime under PEREGRINE_HOME/runtimes/")
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        default=None,
        help="CPU matrix products that round the same for any batch size (exact answers "
        "for K-quant models too; slower prompts for them)",
    )
    g = p.add_argument_group("lifetime")
    g.add_argument(
        "--parent-pid", type=int, default=None, help="exit within 2 s of this process's death"
    )
    return p


def _read_chat_template(path: str | None) -> str | None:
    """The text of `--chat-template-file`, checked by compiling it (a clear error, not a traceback)."""
    if path is None:
        return None
    from engine.gguf.chat_template import ChatTemplate, TemplateError

    try:
        source = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeregrineError(f"cannot read the chat template file {path}: {exc}") from exc
    try:
        ChatTemplate(source)
    except TemplateError as exc:
        raise PeregrineError(f"the chat template file {path} is not usable: {exc}") from exc
    return source


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_request(
    args: argparse.Namespace,
    model_path: str,
    selector: RuntimeSelector | None = None,
    pinned: Selection | None = None,
) -> LoadRequest:
    """The load the command line asks for. With `--plan auto` the planner fills in the rest,
    choosing among the runtimes that pass their self-test (`pinned`: the one `--runtime` gave)."""
    base: dict[str, Any] = {
        "model": model_path,
        "draft_model": args.draft_model,
        "runtime": args.runtime,
    }
    if args.plan == "auto":
        # The planner is optional at this layer.
        from engine.planning.hardware import detect_hardware, working_runtimes
        from engine.planning.planner import Pins, plan_for_file

        pins = Pins()
        if args.draft_model and args.draft_model != "auto":
            from engine.gguf.header import validate_gguf_file
            from engine.planning.estimate import shape_from_header

            # The draft model's weights, KV and compute take room from the plan.
            pins.draft = shape_from_header(validate_gguf_file(Path(args.draft_model).expanduser()))
        hardware = detect_hardware()
        if pinned is not None:
            # The runtime in use is settled: the plan is made for it (none: the built-in one).
            in_use = pinned.name if pinned.lib_dir is not None else None
            hardware.runtimes = [r for r in hardware.runtimes if r.name == in_use]
            pins.runtime = in_use
            base["runtime"] = in_use
        elif selector is not None:
            hardware = working_runtimes(hardware, selector.problem)
        planned = plan_for_file(Path(model_path), hardware=hardware, pins=pins).load.model_dump()
        base = {**planned, **{k: v for k, v in base.items() if v is not None}}
    else:
        base.update(n_ctx=4096, flash_attn="auto")
    if not args.mtp:
        base["mtp"] = False
    explicit = {
        "n_ctx": args.ctx,
        "n_gpu_layers": args.gpu_layers,
        "type_k": args.cache_type_k,
        "type_v": args.cache_type_v,
        "flash_attn": args.flash_attn,
        "threads": args.threads,
        "n_batch": args.batch_size,
        "n_ubatch": args.ubatch_size,
        "tensor_split": _split(args.tensor_split),
        "n_cpu_moe": args.n_cpu_moe,
        "expert_offload": args.cpu_moe or None,
        "n_parallel": _parallel(args.parallel),
        "kv_unified": args.kv_unified,
        "batch_invariant": args.batch_invariant,
    }
    base.update({k: v for k, v in explicit.items() if v is not None})
    try:
        return LoadRequest.model_validate(base)
    except ValidationError as exc:
        # One line, naming the setting: the error event is shown to a user as is.
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise UsageError(f"invalid settings: {where}: {err['msg']}") from exc


def _parallel(text: str | None) -> int | None:
    """`--parallel N|auto` (llama-server's -np; -1 is its auto); None when not given."""
    if text is None:
        return None
    if text.strip().lower() in ("auto", "-1"):
        return AUTO_PARALLEL
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise UsageError(f"--parallel takes a number of slots from 1 to 64, or auto: {text!r}")
    return n


def _split(text: str | None) -> list[float] | None:
    """`--tensor-split 3,1` (llama-server's form); None when not given."""
    if text is None:
        return None
    try:
        split = [float(part) for part in text.split(",")]
    except ValueError:
        split = []
    if not split or not all(math.isfinite(s) and s >= 0 for s in split):
        raise UsageError(f"--tensor-split takes numbers, 0 or more, separated by commas: {text!r}")
    return split


def _check_args(args: argparse.Namespace) -> None:
    """Refuses values argparse lets through but nothing downstream can use."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    if args.parent_pid is not None and args.parent_pid <= 0:
        raise UsageError(f"--parent-pid must be a process id (> 0), not {args.parent_pid}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    if args.queue_limit < 1:
        raise UsageError(f"--queue-limit must be at least 1, not {args.queue_limit}")


def check_jinja2(version: str) -> None:
    """Refuses a jinja2 whose sandbox model templates can escape."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    if tuple(parts + [0] * (3 - len(parts))) < MIN_JINJA2:
        raise PeregrineError(
            f"jinja2 {version} is too old: chat templates could escape its sandbox "
            "(CVE-2024-56326, CVE-2025-27516); install jinja2 3.1.6 or later"
        )


def _load_roots(args: argparse.Namespace, model_path: str) -> list[Path] | None:
    """Where /v1/engine/load may load from: anywhere on loopback, else the models folders.

    The files served from the start (--model, --draft-model) stay loadable, by
    themselves: not the folders they are in.
    """
    if _is_loopback(args.host):
        return None
    roots = [Paths.from_env().models, *(Path(d).expanduser() for d in args.models_dir)]
    roots.append(Path(model_path))
    if args.draft_model and args.draft_model != "auto":
        roots.append(Path(args.draft_model).expanduser())
    return roots


@contextlib.contextmanager
def _heartbeat(events: EventWriter, every_s: float = 5.0) -> Iterator[None]:
    """Emits `loading` (progress 0) every few seconds while the block runs."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            events.emit("loading", progress=0.0)

    thread = threading.Thread(target=beat, name="start-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _validate_model(path: str) -> object:
    p = Path(path)
    if not p.exists():
        raise PeregrineError(f"model file not found: {path}")
    if not p.is_file():
        raise PeregrineError(f"not a model file: {path}")
    try:
        from engine.gguf.header import validate_gguf_file
    except ImportError:  # pragma: no cover - the reader ships with the engine
        return None
    return validate_gguf_file(p)


def _preflight_load(request: LoadRequest) -> None:
    """Loads `request` once in a child process (no allocation) before the model in use goes.

    Only a crash refuses the load: other trouble in the trial (a timeout, an
    odd runtime) is logged and the real load decides.
    """
    from engine.planning.probe import DryRunCrashed, measure

    try:
        measure(request, timeout_s=120.0)
    except DryRunCrashed as exc:
        raise PeregrineError(
            f"llama.cpp crashed on {request.model} in a trial load, so the model in use "
            f"was kept ({exc})"
        ) from exc
    except PeregrineError as exc:
        log.warning("trial load of %s did not finish (%s); loading it anyway", request.model, exc)


def _parent_alive(pid: int, started: float | None) -> bool:
    """Whether the watched process still runs.

    A dead process that its own parent has not reaped yet is a zombie, and
    `kill(pid, 0)` still succeeds on it; a reused pid has a new start time.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and proc.create_time() != started:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else


def _watch_parent(pid: int, on_death: Any) -> None:
    import psutil

    try:
        started: float | None = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None  # gone already (or unreadable): the first check decides

    def run() -> None:
        while _parent_alive(pid, started):
            if os.getppid() == 1 and pid != 1:
                break  # re-parented to init: our parent is gone
            time.sleep(0.4)
        log.warning("parent process %d is gone; shutting down", pid)
        on_death()
        time.sleep(1.2)
        os._exit(0)  # the graceful path did not finish in time

    threading.Thread(target=run, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    events = EventWriter(sys.stdout)
    # Nothing but events may reach stdout: route stray prints (from libraries) to stderr.
    sys.stdout = sys.stderr
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    for name in ("peregrine.llama", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return asyncio.run(_serve(args, events))
    except PeregrineError as exc:
        events.emit("error", message=str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        # Whatever failed, the supervisor reads one error event, not a traceback on stderr alone.
        log.exception("the engine failed to start")
        events.emit("error", message=f"the engine failed to start: {type(exc).__name__}: {exc}")
        return 1


async def _serve(args: argparse.Namespace, events: EventWriter) -> int:
    from engine.default_model import default_model_path

    _check_args(args)
    import jinja2

    check_jinja2(jinja2.__version__)
    api_key = args.api_key or os.environ.get("PEREGRINE_API_KEY") or ""
    if not _is_loopback(args.host) and not api_key:
        raise UsageError(f"binding to {args.host} (not loopback) requires an explicit --api-key")
    api_key = api_key or secrets.token_urlsafe(32)
    model_path = str(Path(args.model).expanduser()) if args.model else str(default_model_path())
    _validate_model(model_path)
    selector = RuntimeSelector(Paths.from_env())
    # A runtime's first self-test (and a plan's dry run) may take a while: `loading`
    # events meanwhile tell the supervisor that the start has not stalled.
    with _heartbeat(events):
        pinned = selector.choose(args.runtime) if args.runtime else None
        request = _load_request(args, model_path, selector, pinned)
        # `--plan auto` may have picked the runtime (the cpu one on a CPU-only machine).
        runtime = pinned or selector.choose(request.runtime)
    activate(runtime)
    in_use = runtime.name if runtime.lib_dir is not None else None
    request = request.model_copy(update={"runtime": in_use})
    chat_template = _read_chat_template(args.chat_template_file)

    from aiohttp import web

    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
    from engine.serving.scheduler import Engine
    from engine.serving.server import ServerConfig, build_app, make_runner
    from engine.wire.control import RuntimeInfo

    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PeregrineError(f"cannot listen on {args.host}:{args.port}: {reason}") from exc
    port = sock.getsockname()[1]

    engine = Engine(
        queue_limit=args.queue_limit,
        state_cache_bytes=max(args.cache_ram, 0) << 20,
        runtime=RuntimeInfo(
            name=runtime.name,
            backend=runtime.backend,
            requested=runtime.requested,
            fallback_reason=runtime.fallback_reason,
        ),
        validate=_validate_model,
        preflight=_preflight_load,
        draft_folders=[Paths.from_env().models, *(Path(d).expanduser() for d in args.models_dir)],
        chat_template=chat_template,
        tool_self_test=args.tool_self_test == "on",
    )
    config = ServerConfig(
        api_key=api_key,
        host=args.host,
        allowed_hosts=set(args.allowed_host),
        io_timeout=args.timeout,
        load_roots=_load_roots(args, model_path),
    )
    app = build_app(engine, config)
    runner = make_runner(app, config)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.parent_pid:
        _watch_parent(args.parent_pid, lambda: loop.call_soon_threadsafe(stop.set))

    try:
        done = engine.load(request)
        while not done.is_set():
            events.progress(engine.load_progress)
            await asyncio.sleep(0.05)
            if stop.is_set():
                return 0
        if engine.state != "ready":
            raise PeregrineError(engine.error or "the model failed to load")
        events.progress(1.0)
        events.emit("ready", host=args.host, port=port, api_key=api_key, model=engine.model_id)
        log.info("serving %s on http://%s:%d", engine.model_id, args.host, port)
        await stop.wait()
        return 0
    finally:
        log.info("shutting down")
        await runner.cleanup()
        log.info("server closed")
        # A token already in llama_decode cannot be interrupted; don't wait long for it.
        await loop.run_in_executor(None, engine.shutdown, 3.0)
        log.info("engine stopped")
