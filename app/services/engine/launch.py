"""Starting the local engine, without Qt: its command line, start-up events, log tail.

The engine (`peregrine serve`) prints one JSON object per stdout line while it
starts (docs/api.md); these helpers turn that into typed events and decide
when a start has stalled and whether a crashed engine may be restarted.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.services.settings import EngineSettings, LoadSettings, LocalApi
from engine.child import ENTRY_MODULE, module_argv

log = logging.getLogger(__name__)


class SupervisorState(StrEnum):
    """Where the local engine process stands."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"


@dataclass(frozen=True)
class LaunchSpec:
    """What the engine is started with; a crash restart reuses it.

    `api_key` reaches the engine through PEREGRINE_API_KEY, never its command
    line (which every local user can read); empty: the engine makes a random one.
    """

    model: Path
    n_ctx: int | None = None
    threads: int | None = None
    draft_model: Path | None = None
    n_gpu_layers: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: str | None = None
    runtime: str | None = None
    tensor_split: tuple[float, ...] | None = None
    n_cpu_moe: int | None = None
    expert_offload: bool = False
    port: int = 0
    api_key: str = field(default="", repr=False)
    extra_args: tuple[str, ...] = ()

    def with_model(self, model: Path, load: LoadSettings, engine: EngineSettings) -> LaunchSpec:
        """The same engine (port, key) with another model and its settings."""
        return launch_spec(model, load, engine, None, port=self.port, api_key=self.api_key)


def launch_spec(
    model: Path,
    load: LoadSettings,
    engine: EngineSettings,
    api: LocalApi | None,
    *,
    port: int = 0,
    api_key: str = "",
) -> LaunchSpec:
    """A model's remembered load settings over the engine defaults, on the local API's port."""
    if api is not None:
        shared = api.shared and bool(api.api_key.get_secret_value())
        port = api.port if shared else 0
        api_key = api.api_key.get_secret_value() if shared else ""
    return LaunchSpec(
        model=model,
        n_ctx=load.n_ctx or engine.n_ctx,
        threads=load.threads or engine.threads,
        draft_model=Path(load.draft_model) if load.draft_model else None,
        n_gpu_layers=load.n_gpu_layers,
        type_k=load.type_k,
        type_v=load.type_v,
        flash_attn=load.flash_attn,
        runtime=load.runtime,
        tensor_split=tuple(load.tensor_split) if load.tensor_split else None,
        n_cpu_moe=load.n_cpu_moe or None,
        expert_offload=bool(load.expert_offload),
        port=port,
        api_key=api_key,
    )


@dataclass(frozen=True)
class Loading:
    """The model is loading; progress is 0..1."""

    progress: float


@dataclass(frozen=True)
class Ready:
    """The engine listens and the model is loaded."""

    host: str
    port: int
    api_key: str
    model: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@dataclass(frozen=True)
class StartFailed:
    """The engine said it cannot start, and why."""

    message: str


StartupEvent = Loading | Ready | StartFailed


def serve_command(spec: LaunchSpec, parent_pid: int, python: str | None = None) -> list[str]:
    """The argv that runs `peregrine serve` for this spec, tied to the parent's life.

    `python` None: this program's own interpreter, or the bundle's executable when frozen.
    """
    argv = [*module_argv(ENTRY_MODULE, python), "serve", "--model", str(spec.model)]
    argv += ["--port", str(spec.port), "--parent-pid", str(parent_pid)]
    for flag, value in (
        ("--ctx", spec.n_ctx),
        ("--threads", spec.threads),
        ("--draft-model", spec.draft_model),
        ("--gpu-layers", spec.n_gpu_layers),
        ("--cache-type-k", spec.type_k),
        ("--cache-type-v", spec.type_v),
        ("--flash-attn", spec.flash_attn),
        ("--runtime", spec.runtime),
        ("--tensor-split", ",".join(f"{s:g}" for s in spec.tensor_split or ()) or None),
        ("--n-cpu-moe", spec.n_cpu_moe),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if spec.expert_offload:
        argv.append("--cpu-moe")
    argv += list(spec.extra_args)
    return argv


def parse_event(line: str) -> StartupEvent | None:
    """One stdout line as an event; None (logged) for anything that is not one."""
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        log.warning("engine stdout line is not JSON: %.200s", line)
        return None
    if not isinstance(data, dict):
        log.warning("engine stdout line is not an object: %.200s", line)
        return None
    event = data.get("event")
    try:
        if event == "loading":
            return Loading(min(1.0, max(0.0, float(data.get("progress", 0.0)))))
        if event == "ready":
            return Ready(
                host=str(data["host"]),
                port=int(data["port"]),
                api_key=str(data.get("api_key") or ""),
                model=str(data.get("model") or ""),
            )
        if event == "error":
            return StartFailed(str(data.get("message") or "the engine failed to start"))
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("malformed engine event %.200s: %s", line, exc)
        return None
    log.info("ignoring engine event %r", event)
    return None


class LineSplitter:
    """Turns arbitrary chunks of process output into whole lines."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, chunk: str) -> list[str]:
        text = self._partial + chunk
        *lines, self._partial = text.split("\n")
        return [ln.rstrip("\r") for ln in lines]

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, ""
        return [rest] if rest else []


class LogTail:
    """The last lines of the engine's stderr, kept for the error panel."""

    def __init__(self, max_lines: int = 200) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._splitter = LineSplitter()

    def feed(self, chunk: str) -> None:
        self._lines.extend(self._splitter.feed(chunk))

    def lines(self, last: int | None = None) -> list[str]:
        pending = self._splitter.flush()
        self._lines.extend(pending)
        items = list(self._lines)
        return items if last is None else items[-last:]

    def text(self, last: int | None = None) -> str:
        return "\n".join(self.lines(last))


@dataclass
class StartupWatch:
    """Decides when a start has stalled: the timeout restarts whenever loading progresses."""

    stall_timeout_s: float
    clock: Callable[[], float]
    _last_progress_at: float = field(init=False)

    def __post_init__(self) -> None:
        self._last_progress_at = self.clock()

    def saw(self, event: StartupEvent | None) -> None:
        if isinstance(event, Loading):
            self._last_progress_at = self.clock()

    def stalled(self) -> bool:
        return self.clock() - self._last_progress_at > self.stall_timeout_s


class RestartPolicy:
    """Allows restarts after crashes, but not an endless crash loop."""

    def __init__(
        self, clock: Callable[[], float], max_restarts: int = 3, window_s: float = 60.0
    ) -> None:
        self._clock = clock
        self._max = max_restarts
        self._window = window_s
        self._restarts: deque[float] = deque()

    def allow(self) -> bool:
        """True (and counted) when one more restart is allowed now."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self._window:
            self._restarts.popleft()
        if len(self._restarts) >= self._max:
            return False
        self._restarts.append(now)
        return True

    def delay_s(self) -> float:
        """Back-off before the restart just allowed: the first at once, then growing."""
        return (0.0, 0.0, 0.5, 2.0)[min(len(self._restarts), 3)]


def describe_exit(exit_code: int, crashed: bool, tail: Iterable[str]) -> str:
    """A plain-words sentence about why the engine stopped."""
    if crashed:
        # A crash or a kill leaves no last words worth quoting; the log is one click away.
        return "The engine stopped unexpectedly (it crashed or was killed)."
    last = [ln for ln in tail if ln.strip()]
    hint = f" Its last words: {last[-1].strip()[:160]}" if last else ""
    return f"The engine exited with code {exit_code}.{hint}"
