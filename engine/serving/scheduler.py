"""The engine core: one decode thread, parallel slots, a bounded queue, load/unload, status.

Everything that touches llama.cpp runs on the decode thread; HTTP handlers
submit jobs and receive typed events (`JobEvent`) back through one callback.
The thread admits queued jobs into free slots (the app's own requests
first, then in arrival order), and runs one decoder step, one batch for
every busy slot, at a time (engine/decoding/decoder.py). Cancellation is
cooperative: a slot checks its job's `cancel` event every step, so a stop or
a dropped client frees the slot within one step. Loads and unloads queue
behind the jobs sent before them. Models come from an injected factory
(`ModelFactory`), by default llama.cpp's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from engine.backend.llama import LlamaLogCapture, LlamaModel, MemoryReport, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.model import Model, Sampler
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams, TokenLogprob
from engine.decoding.slot import Slot
from engine.errors import PeregrineError
from engine.gguf.chat_template import ChatTemplate
from engine.paths import Paths
from engine.runtimes import BUILT_IN
from engine.serving.draft_pairing import AUTO, DraftTrial, find_draft
from engine.speculative.drafters import build_chain, model_drafter
from engine.speculative.mtp import MtpHeads
from engine.tools import self_test
from engine.tools.formats import ToolFormat, detect_format
from engine.tools.prompt import prepare_chat
from engine.wire.control import (
    DEFAULT_QUEUE_LIMIT,
    EngineState,
    EngineStatus,
    LoadRequest,
    MemoryFigures,
    ModelRef,
    QueueInfo,
    RuntimeInfo,
    SlotStatus,
    SpeculativeStatus,
    ToolFormatStatus,
)

log = logging.getLogger("peregrine.scheduler")


class QueueFull(PeregrineError):
    """Too many requests are waiting."""


class NotReady(PeregrineError):
    """No model is loaded (or it is still loading)."""


class BadRequest(PeregrineError):
    """A request that only the loaded model can tell is wrong; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(PeregrineError):
    """The prompt does not fit the context."""

    def __init__(self, n_prompt: int, n_ctx: int, *, at_least: bool = False) -> None:
        # at_least: counted from bytes without tokenizing (a prompt far too long).
        count = f"at least {n_prompt}" if at_least else f"{n_prompt}"
        super().__init__(
            f"the prompt has {count} tokens, more than the context of {n_ctx} tokens allows"
        )
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class ServedModel(Model, Protocol):
    """What the engine needs from a loaded model beyond decoding (LlamaModel implements it)."""

    request: LoadRequest
    memory_report: MemoryReport

    # Its MTP heads (engine/backend/mtp.py): the context drafting with them when
    # usable, how many the file carries, and why they are not used.
    @property
    def mtp(self) -> MtpHeads | None: ...
    @property
    def mtp_heads(self) -> int: ...
    @property
    def mtp_reason(self) -> str | None: ...

    @property
    def bos(self) -> int: ...
    @property
    def eos(self) -> int: ...
    @property
    def add_bos(self) -> bool: ...
    @property
    def max_token_bytes(self) -> int: ...
    @property
    def control_texts(self) -> frozenset[str]: ...

    def meta(self, key: str) -> str | None: ...
    def token_text(self, token: int) -> str: ...
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...
    def vocab_fingerprint(self) -> str: ...
    def greedy_sampler(self) -> Sampler: ...
    def close(self) -> None: ...


class ModelFactory(Protocol):
    """Loads a model (the engine's own, or a draft model) for the decode thread."""

    def __call__(
        self, request: LoadRequest, *, progress: Callable[[float], bool | None] | None = None
    ) -> ServedModel: ...


# --- events from the decode thread to a request's handler ------------------------


@dataclass(frozen=True)
class Started:
    """The job left the queue: its prompt is tokenized and fits."""

    n_prompt: int
    granted: int  # max_tokens granted
    # The prompt ends inside `<think>` (the template opened the reasoning): the answer starts in it.
    reasoning_open: bool = False


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer, in order, with the logprobs of its tokens when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    """The last event of every job: a result, or the error that ended it (neither: cancelled)."""

    result: GenerationResult | None
    error: BaseException | None


JobEvent = Started | TextDelta | Done


@dataclass
class PromptSpec:
    """A prompt as the client sent it: chat messages, text, or token ids."""

    messages: list[dict[str, Any]] | None = None
    # OpenAI's tool objects, for the chat template (engine/tools/prompt.py).
    tools: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None


@dataclass
class Job:
    """One generation request in flight, with callbacks run on the decode thread."""

    prompt: PromptSpec
    sampling: SamplingParams
    max_tokens: int | None
    stop: list[str]
    speculative: SpecParams
    emit: Callable[[JobEvent], None]  # runs on the decode thread
    cancel: threading.Event = field(default_factory=threading.Event)
    grammar: str | None = None  # compiled by engine/structured/schema.py
    top_logprobs: int | None = None  # None: no logprobs
    # "app": the desktop app's own chat, admitted ahead of queued API requests.
    priority: Literal["app", "api"] = "api"


@dataclass
class _Control:
    """A load or an unload, run on the decode thread once no slot is busy."""

    kind: Literal["load", "unload"]
    work: Callable[[], None]
    done: threading.Event


@dataclass
class _Running:
    """A job admitted into a slot, and the logprobs its next text brings."""

    job: Job
    slot: Slot
    held: list[TokenLogprob] = field(default_factory=list)


def _take(items: list[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    taken = tuple(items)
    items.clear()
    return taken


def model_id_for(path: str) -> str:
    name = Path(path).name
    return name[:-5] if name.lower().endswith(".gguf") else name


class Engine:
    """Owns the model and serialises all work on it."""

    def __init__(
        self,
        *,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        state_cache_bytes: int = 1 << 30,
        runtime: RuntimeInfo | None = None,
        validate: Callable[[str], object] | None = None,
        preflight: Callable[[LoadRequest], object] | None = None,
        log_capture: LlamaLogCapture | None = None,
        model_factory: ModelFactory | None = None,
        draft_folders: Sequence[Path] | None = None,
        chat_template: str | None = None,
        tool_self_test: bool = False,
    ) -> None:
        self.queue_limit = queue_limit
        self.runtime = runtime or RuntimeInfo(name="default", backend="cpu")
        self._validate = validate
        # A trial load elsewhere (a child process) before a model in use is
        # given up: a llama.cpp abort must not take the working model with it.
        self._preflight = preflight
        # llama.cpp's log callback must outlive every model it loads: only
        # llama.cpp's own factory needs one (an injected factory brings its own).
        self._log_capture = log_capture or (LlamaLogCapture() if model_factory is None else None)
        self._model_factory = model_factory or self._load_llama
        # Where `draft_model: auto` looks for a draft (the library by default).
        self._draft_folders = (
            list(draft_folders) if draft_folders is not None else [Paths.from_env().models]
        )
        self._trial: DraftTrial | None = None
        # Jobs and controls in arrival order; jobs ahead of the first control
        # may be admitted, a control runs when it is first and no slot is busy.
        self._queue: deque[Job | _Control] = deque()
        # Short calls (count_tokens) run between two steps, ahead of everything.
        self._calls: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._running: dict[int, _Running] = {}  # by slot
        self._pending_loads = 0
        self._loading: _Control | None = None  # the load in progress
        self._abort_load = False
        self.state: EngineState = "idle"
        self.load_progress = 0.0
        self.error: str | None = None
        self.settings: LoadRequest | None = None
        self.model: ServedModel | None = None
        self.draft_model: ServedModel | None = None
        self.decoder: Decoder | None = None
        self.template: ChatTemplate | None = None
        # `--chat-template-file`: used instead of every loaded model's own template.
        self.chat_template = chat_template
        self.tool_format: ToolFormat | None = None
        # The tool-call self-test's outcome (engine/tools/self_test.py): passed, and why not.
        self.tool_self_test: tuple[bool, str | None] | None = None
        # Run the self-test after each load (the engine process does; tests of the core don't).
        self._self_test_enabled = tool_self_test
        self._self_test_job: Job | None = None
        self._loads = 0  # counts loads, so a self-test of an unloaded model is dropped
        self._state_cache = PrefixStateCache(state_cache_bytes)
        self._thread = threading.Thread(target=self._run, name="peregrine-decode", daemon=True)
        self._thread.start()

    # --- decode thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            dropped: list[Job] = []
            admit: list[Job] = []
            control: _Control | None = None
            calls: list[Callable[[], None]] = []
            with self._wake:
                while True:
                    calls += self._calls
                    self._calls.clear()
                    dropped += self._take_cancelled()
                    if self._closing:
                        break
                    decoder = self.decoder
                    busy = decoder is not None and decoder.busy
                    jobs = self._admissible()
                    if jobs:
                        # Without a model every job fails at once (NotReady).
                        free = decoder.free_slots if decoder is not None else len(jobs)
                        admit = self._pick(jobs, free)
                    elif not busy and self._queue:
                        item = self._queue.popleft()
                        assert isinstance(item, _Control)
                        control = item
                    if admit or control or busy or dropped or calls:
                        break
                    self._wake.wait()
                closing = self._closing
            for call in calls:
                call()
            for job in dropped:
                job.emit(Done(None, None))
            if closing:
                # Every job was cancelled: one more step ends the running ones
                # as a cancel does (finish_reason "cancelled").
                self._step()
                break
            if control is not None:
                self._run_control(control)
                continue
            for job in admit:
                self._start(job)
            self._step()
        self._drain()
        self._unload_now()

    def _drain(self) -> None:
        """Ends every job still running or queued when the engine stops."""
        with self._lock:
            jobs = [r.job for r in self._running.values()]
            jobs += [i for i in self._queue if isinstance(i, Job)]
            self._running.clear()
            self._queue.clear()
        for job in jobs:
            job.cancel.set()
            job.emit(Done(None, None))

    def _admissible(self) -> list[Job]:
        """Queued jobs ahead of the first load or unload (call with the lock)."""
        jobs: list[Job] = []
        for item in self._queue:
            if isinstance(item, _Control):
                break
            jobs.append(item)
        return jobs

    def _pick(self, jobs: list[Job], n: int) -> list[Job]:
        """Up to n jobs to admit: the app's first, then in arrival order (call with the lock)."""
        if n <= 0:
            return []
        chosen = [j for j in jobs if j.priority == "app"][:n]
        chosen += [j for j in jobs if j.priority != "app"][: n - len(chosen)]
        for job in chosen:
            self._queue.remove(job)
        return chosen

    def _take_cancelled(self) -> list[Job]:
        """Removes queued jobs whose client gave up (call with the lock)."""
        gone = [i for i in self._queue if isinstance(i, Job) and i.cancel.is_set()]
        for job in gone:
            self._queue.remove(job)
        return gone

    def _run_control(self, control: _Control) -> None:
        try:
            control.work()
        except Exception:  # a control reports its own errors; this is a last guard
            log.exception("engine %s failed", control.kind)
        finally:
            control.done.set()

    def _cancel_everything(self) -> None:
        """Cancels the running jobs and every queued one (for unload and shutdown)."""
        with self._lock:
            for running in self._running.values():
                running.job.cancel.set()
            for item in self._queue:
                if isinstance(item, Job):
                    item.cancel.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._cancel_everything()
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout)

    # --- loading ------------------------------------------------------------------

    def _load_llama(
        self, request: LoadRequest, *, progress: Callable[[float], bool | None] | None = None
    ) -> ServedModel:
        return LlamaModel(request, progress=progress, log_capture=self._log_capture)

    def load(self, request: LoadRequest) -> threading.Event:
        """Queues a model load; returns an event set when it finished (or failed).

        Nothing changes until the load runs: requests already queued keep the
        model they were sent to, and new ones are accepted meanwhile. A newer
        load replaces one still queued, and aborts one in progress.
        """
        done = threading.Event()
        with self._wake:
            for item in list(self._queue):
                if isinstance(item, _Control) and item.kind == "load":
                    # Superseded before it ran: the newer load is what the user wants.
                    self._queue.remove(item)
                    self._pending_loads -= 1
                    item.done.set()
            if self._loading is not None:
                self._abort_load = True
            # Visible at once (state "loading"), but the model in use and its
            # settings only change when the load actually runs.
            self._pending_loads += 1
            self.state = "loading"
            self.load_progress = 0.0
            self.error = None

        def work() -> None:
            try:
                self._load_now(request)
            finally:
                with self._lock:
                    self._loading = None
                    self._abort_load = False
                    self._pending_loads -= 1
                    if self._pending_loads and self.state != "error":
                        self.state = "loading"

        control = _Control("load", work, done)

        def start() -> None:
            with self._lock:
                self._loading = control
            work()

        control.work = start
        self._enqueue(control)
        return done

    def _enqueue(self, item: Job | _Control) -> None:
        with self._wake:
            self._queue.append(item)
            self._wake.notify_all()

    def _load_now(self, request: LoadRequest) -> None:
        try:
            if request.runtime and request.runtime == self.runtime.requested:
                # The runtime asked for at start-up failed; this engine runs its fallback.
                in_use = None if self.runtime.name == BUILT_IN else self.runtime.name
                request = request.model_copy(update={"runtime": in_use})
            if request.runtime and request.runtime != self.runtime.name:
                # A runtime is a llama.cpp library, loaded once per process.
                raise PeregrineError(
                    f"this engine runs the {self.runtime.name!r} runtime; using "
                    f"{request.runtime!r} needs an engine started with --runtime {request.runtime}"
                )
            # Check the file before giving up the model in use: a bad path or
            # a hostile file must not cost the user their working engine.
            if self._validate is not None:
                self._validate(request.model)
                if request.draft_model and request.draft_model != AUTO:
                    self._validate(request.draft_model)
            if self._preflight is not None and self.model is not None:
                self._preflight(request)
        except PeregrineError as exc:
            self._fail_load(str(exc), keep_current=self.model is not None)
            return
        previous = self.model.request if self.model is not None else None
        self._unload_now()
        with self._lock:
            self.state = "loading"
            self.load_progress = 0.0
            self.error = None
            self.settings = request
        try:
            self._install(request)
        except Exception as exc:
            if self._abort_load:
                # A newer load replaced this one (it runs next).
                log.info("model load superseded: %s", request.model)
                return
            message = (
                str(exc) if isinstance(exc, PeregrineError) else f"{type(exc).__name__}: {exc}"
            )
            if not isinstance(exc, PeregrineError):
                log.exception("model load failed")
            if previous is not None and self._reload(previous):
                # llama.cpp refused the new file: the previous model serves on.
                self._fail_load(message, keep_current=True)
            else:
                self._fail_load(message)
            return
        log.info(
            "model loaded: %s (n_ctx %d)", request.model, self.model.n_ctx if self.model else 0
        )
        if self._self_test_enabled:
            threading.Thread(
                target=self._run_self_test, args=(self._loads,), name="tool-self-test", daemon=True
            ).start()

    def _reload(self, request: LoadRequest) -> bool:
        try:
            self._install(request)
        except Exception:
            log.exception("could not reload the previous model %s", request.model)
            return False
        return True

    def _install(self, request: LoadRequest) -> None:
        """Loads a model (and its draft model) and makes it the one in use."""
        model = self._model_factory(request, progress=self._on_progress)
        try:
            self.draft_model = self._load_draft(request, model)
            source = self.chat_template or model.meta("tokenizer.chat_template")
            self.template = ChatTemplate(
                source,
                bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
                eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
            )
            controls = model.control_texts
            self.tool_format = detect_format(self.template.source, controls.__contains__)
        except BaseException:
            # The draft model may be loaded already: it goes with the model.
            if self.draft_model is not None:
                self.draft_model.close()
                self.draft_model = None
            model.close()
            raise
        self.model = model
        draft, mtp = self.draft_model, model.mtp
        self.decoder = Decoder(
            model,
            state_cache=self._state_cache,
            chains=lambda seq: build_chain(draft, mtp, seq=seq),
        )
        if request.draft_model == AUTO and self.draft_model is not None:
            drafter = model_drafter(self.decoder.drafters, self.draft_model)
            self._trial = DraftTrial(drafter) if drafter is not None else None
        with self._lock:
            self.state = "ready"
            self.load_progress = 1.0
            # llama.cpp may round n_ctx up (to a multiple of 256): report what is in force.
            self.settings = request.model_copy(update={"n_ctx": model.n_ctx})

    def _load_draft(self, request: LoadRequest, model: ServedModel) -> ServedModel | None:
        if not request.draft_model:
            return None
        path = request.draft_model
        auto = path == AUTO
        if auto:
            found = find_draft(Path(request.model), self._draft_folders)
            if found is None:
                log.info("draft model auto: none in the library has this model's vocabulary")
                return None
            path = str(found)
            log.info("draft model auto: trying %s", path)
        n_gpu_layers, split = _draft_placement(request)
        draft = self._model_factory(
            LoadRequest(
                model=path,
                n_ctx=model.n_ctx,
                n_gpu_layers=n_gpu_layers,
                tensor_split=split,
                # The same cache types as the model's (what the planner counts).
                type_k=request.type_k,
                type_v=request.type_v,
                flash_attn=request.flash_attn,
                threads=request.threads,
                n_batch=request.n_batch,
                n_ubatch=request.n_ubatch,
                # One draft sequence per slot of the model.
                n_parallel=request.n_parallel,
                kv_unified=request.kv_unified,
                mtp=False,  # a draft model drafts by itself
            ),
        )
        if draft.vocab_fingerprint() != model.vocab_fingerprint():
            draft.close()
            if auto:
                log.info("draft model auto: %s differs in vocabulary after all", path)
                return None
            raise PeregrineError(
                "the draft model's vocabulary differs from the model's, so its drafts "
                "could never be accepted: pick a draft model of the same family"
            )
        return draft

    @property
    def mtp_unavailable(self) -> str | None:
        """Why the model in use drafts without MTP heads (None: it has none, or uses them)."""
        model = self.model
        if model is None:
            return "no model is loaded"
        return model.mtp_reason if model.mtp is None else None

    @property
    def drafter_names(self) -> Sequence[str]:
        """The drafters a request may ask for by speculative type, in chain order."""
        decoder = self.decoder
        return [d.name for d in decoder.drafters] if decoder is not None else []

    def _fail_load(self, message: str, *, keep_current: bool = False) -> None:
        with self._lock:
            self.error = message
            if keep_current and self.model is not None:
                # The previous model keeps serving; the failure shows in status.
                self.state = "ready"
                self.settings = self.model.request
                self.load_progress = 1.0
            else:
                self.state = "error"
        log.error("model load failed: %s", message)

    def _on_progress(self, value: float) -> bool:
        """llama.cpp's load progress; False aborts a load a newer one replaced."""
        self.load_progress = max(0.0, min(1.0, value))
        return not self._abort_load

    def unload(self) -> threading.Event:
        """Cancels the running and queued requests, then unloads (they do not run to the end)."""
        done = threading.Event()

        def work() -> None:
            self._unload_now()
            with self._lock:
                self.state = "idle"
                self.settings = None

        with self._wake:
            for running in self._running.values():
                running.job.cancel.set()
            for item in self._queue:
                if isinstance(item, Job):
                    item.cancel.set()
            self._queue.append(_Control("unload", work, done))
            self._wake.notify_all()
        return done

    def _drop_draft(self) -> None:
        """Stops drafting with the draft model and frees it (an auto pairing that did not pay)."""
        decoder, draft = self.decoder, self.draft_model
        self._trial = None
        if decoder is None or draft is None:
            return
        # Every slot's chain drafts with it; a slot decoding now drops its drafter
        # on the first failed draft and carries on (engine/decoding/slot.py).
        for chain in decoder.chains:
            drafter = model_drafter(chain, draft)
            if drafter is not None:
                chain.remove(drafter)
                drafter.close()
        with self._lock:
            self.draft_model = None
        draft.close()

    def _unload_now(self) -> None:
        self._trial = None
        if self.decoder is not None:
            self.decoder.close()
        if self.draft_model is not None:
            self.draft_model.close()
        self.draft_model = None
        if self.model is not None:
            self.model.close()
        self.model = None
        self.decoder = None
        self.template = None
        self.tool_format = None
        self.tool_self_test = None
        self._loads += 1
        self._state_cache.clear()

    # --- generation ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queues a generation; raises QueueFull or NotReady at once."""
        with self._wake:
            # Behind a pending load a request waits for the model it brings.
            if self.model is None and not self._pending_loads:
                raise NotReady(self.error or "no model is loaded")
            test = self._self_test_job
            if job is not test:
                if self._live_waiting() >= self.queue_limit:
                    raise QueueFull(
                        f"the engine is busy: {self._live_waiting()} requests are waiting "
                        f"(the limit is {self.queue_limit})"
                    )
                if test is not None:
                    # The self-test yields to real requests (it runs again later) and
                    # never takes a place in the queue.
                    test.cancel.set()
            self._queue.append(job)
            self._wake.notify_all()

    def _live_waiting(self) -> int:
        """Queued jobs whose client still waits, the tool self-test aside (call with the lock)."""
        return sum(
            1
            for i in self._queue
            if isinstance(i, Job) and not i.cancel.is_set() and i is not self._self_test_job
        )

    def _run_self_test(self, load: int, idle_poll: float = 0.2) -> None:
        """Makes one forced tool call when the engine is idle, and records whether it parsed."""
        fmt = self.tool_format
        if fmt is None:
            return
        try:
            grammar = self_test.grammar(fmt)
        except PeregrineError as exc:
            self.tool_self_test = (False, f"the grammar failed: {exc}")
            return
        while self._loads == load and not self._closing:
            with self._lock:
                idle = not self._queue and not self._running and self.state == "ready"
            if not idle:
                threading.Event().wait(idle_poll)
                continue
            events: queue.Queue[JobEvent] = queue.Queue()
            job = Job(
                prompt=PromptSpec(messages=self_test.MESSAGES, tools=self_test.template_tools()),
                sampling=SamplingParams(temperature=0.0),
                max_tokens=self_test.MAX_TOKENS,
                stop=[],
                speculative=SpecParams(type="none"),
                emit=events.put,
                grammar=grammar,
            )
            self._self_test_job = job
            try:
                self.submit(job)
            except (QueueFull, NotReady):
                self._self_test_job = None
                return
            done = events.get()
            while not isinstance(done, Done):
                done = events.get()
            self._self_test_job = None
            if self._loads != load:
                return
            if done.result is not None and done.result.finish_reason != "cancelled":
                self.tool_self_test = self_test.check(
                    fmt, done.result.text, done.result.finish_reason
                )
                log.info("tool self-test (%s): %s", fmt.name, self.tool_self_test)
                return
            if done.error is not None:
                self.tool_self_test = (False, f"the call failed: {done.error}")
                return
            # Cancelled by a real request: try again once the engine is idle.

    def count_tokens(self, prompt: PromptSpec, timeout: float = 60.0) -> int:
        """The prompt's size in tokens, rendered and tokenized on the decode thread (blocks).

        It runs between two steps, without waiting for the running requests."""
        done = threading.Event()
        box: list[int | BaseException] = []

        def work() -> None:
            try:
                if self.model is None:
                    raise NotReady(self.error or "no model is loaded")
                box.append(len(self._tokenize(prompt)))
            except BaseException as exc:
                box.append(exc)
            finally:
                done.set()

        with self._wake:
            if self.model is None and not self._pending_loads:
                raise NotReady(self.error or "no model is loaded")
            self._calls.append(work)
            self._wake.notify_all()
        if not done.wait(timeout):
            raise QueueFull("the engine is busy: counting tokens timed out")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _start(self, job: Job) -> None:
        """Admits a job into a free slot, or ends it with the error that prevents it."""
        try:
            if job.cancel.is_set():
                job.emit(Done(None, None))
                return
            if self.model is None or self.decoder is None:
                raise NotReady("no model is loaded")
            for token, _bias in job.sampling.logit_bias:
                if token >= self.model.n_vocab:
                    raise BadRequest(
                        f"'logit_bias' token id {token} is outside the vocabulary "
                        f"(0..{self.model.n_vocab - 1})",
                        "logit_bias",
                    )
            tokens = self._tokenize(job.prompt)
            if not tokens:
                raise PeregrineError("the prompt is empty")
            # A slot's sequence may hold n_ctx_seq cells (n_ctx in a unified cache).
            n_ctx = self.model.n_ctx_seq
            if len(tokens) >= n_ctx:
                raise PromptTooLong(len(tokens), n_ctx)
            room = n_ctx - len(tokens)
            granted = room if job.max_tokens is None else min(job.max_tokens, room)
            tail = b"".join(self.model.piece(t) for t in tokens[-4:])
            opens = tail.decode("utf-8", "ignore").rstrip().endswith("<think>")
            job.emit(Started(len(tokens), granted, opens))
            # The decoder hands over a text's logprobs just before the text itself.
            held: list[TokenLogprob] = []
            slot = self.decoder.admit(
                GenerationRequest(
                    prompt_tokens=tokens,
                    sampling=job.sampling,
                    max_tokens=granted,
                    stop=job.stop,
                    speculative=job.speculative,
                    cancel=job.cancel,
                    grammar=job.grammar,
                    top_logprobs=job.top_logprobs,
                    on_logprobs=held.extend,
                ),
                lambda text: job.emit(TextDelta(text, _take(held))),
            )
        except BaseException as exc:
            job.emit(Done(None, exc))
            return
        with self._lock:
            self._running[slot.seq] = _Running(job, slot, held)

    def _step(self) -> None:
        """One decoder step for every busy slot; finished jobs get their Done."""
        decoder = self.decoder
        if decoder is None or not decoder.busy:
            self._set_busy(False)
            return
        self._set_busy(self._serving())
        try:
            finished = decoder.step()
        except Exception as exc:  # a bug, not a request's error: end every request
            log.exception("decoder step failed")
            decoder.drop_context()
            finished = []
            for slot in decoder.slots:
                if slot.seq in self._running:
                    slot.fail(exc)
                    finished.append(slot)
        for slot in finished:
            with self._lock:
                running = self._running.pop(slot.seq, None)
            result = slot.result() if slot.error is None else None
            error = slot.error
            slot.release()
            if running is not None:
                running.job.emit(Done(result, error))
        if finished:
            self._judge_trial()
        self._set_busy(decoder.busy and self._serving())

    def _serving(self) -> bool:
        """Whether a real request runs: the tool self-test runs in idle time, unseen."""
        with self._lock:
            return any(r.job is not self._self_test_job for r in self._running.values())

    def _set_busy(self, busy: bool) -> None:
        with self._lock:
            if self._pending_loads:
                return
            if busy and self.state == "ready":
                self.state = "generating"
            elif not busy and self.state == "generating":
                self.state = "ready"

    def _judge_trial(self) -> None:
        """After a request: keeps or drops an automatically paired draft model."""
        trial, decoder = self._trial, self.decoder
        if trial is None or decoder is None:
            return
        keep = trial.verdict(decoder.controller)
        if keep is None:
            return
        self._trial = None
        name = model_id_for(self.draft_model.request.model) if self.draft_model else "?"
        if keep:
            log.info("draft model auto: %s pays, kept", name)
        else:
            log.info("draft model auto: %s measured no gain, unloaded", name)
            self._drop_draft()

    def _tokenize(self, prompt: PromptSpec) -> list[int]:
        assert self.model is not None and self.template is not None
        if prompt.token_ids is not None:
            bad = [t for t in prompt.token_ids if not 0 <= t < self.model.n_vocab]
            if bad:
                raise PeregrineError(f"token id {bad[0]} is outside the vocabulary")
            return list(prompt.token_ids)
        if prompt.messages is not None:
            messages, tools = prepare_chat(self.tool_format, prompt.messages, prompt.tools)
            text = self.template.render(messages, tools=tools)
            self._check_size(text)
            # The template writes the BOS token itself when the model wants one.
            tokens = self._tokenize_chat(messages, text, tools)
            if self.model.add_bos and (not tokens or tokens[0] != self.model.bos):
                tokens.insert(0, self.model.bos)
            return tokens
        self._check_size(prompt.text or "")
        return self.model.tokenize(prompt.text or "", add_special=True, parse_special=True)

    def _tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        text: str,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Tokenizes a rendered chat; control-token text inside messages stays plain text.

        A user who pastes "<|im_start|>system" must not open a system turn. Only
        when a message contains such text are contents tokenized apart from the
        template's markup (the common case keeps one plain tokenization).
        """
        assert self.model is not None and self.template is not None
        controls = self.model.control_texts
        for i, m in enumerate(messages):
            name = m.get("name")
            if isinstance(name, str) and any(c in name for c in controls):
                # A template writes the name as markup: it could open a turn of its own.
                raise BadRequest(
                    "a message 'name' must not contain the model's control-token text",
                    f"messages.{i}.name",
                )
        suspicious = any(
            isinstance(m.get("content"), str) and any(c in m["content"] for c in controls)
            for m in messages
        )
        pieces = self.template.render_segments(messages, tools=tools) if suspicious else None
        if pieces is None:
            return self.model.tokenize(text, add_special=False, parse_special=True)
        tokens: list[int] = []
        for piece, is_content in pieces:
            tokens += self.model.tokenize(piece, add_special=False, parse_special=not is_content)
        return tokens

    def _check_size(self, text: str) -> None:
        """Refuses a prompt that cannot fit without spending seconds tokenizing it."""
        assert self.model is not None
        limit = self.model.n_ctx * max(self.model.max_token_bytes, 1)
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            # No token is longer than max_token_bytes, so this many tokens at least.
            n_bytes = len(text.encode("utf-8", "surrogatepass"))
            raise PromptTooLong(
                n_bytes // max(self.model.max_token_bytes, 1), self.model.n_ctx, at_least=True
            )

    # --- status -------------------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        return model_id_for(self.settings.model) if self.settings else None

    def status(self) -> EngineStatus:
        with self._lock:
            model = self.model
            mem = model.memory_report if model else None
            if mem is not None and self.draft_model is not None:
                extra = self.draft_model.memory_report
                mem = MemoryReport(
                    mem.weights + extra.weights, mem.kv + extra.kv, mem.compute + extra.compute
                )
            decoder = self.decoder
            ctl = decoder.controller if decoder else None
            draft = self.draft_model
            by_model = model_drafter(decoder.drafters, draft) if decoder and draft else None
            return EngineStatus(
                state=self.state,
                load_progress=self.load_progress,
                error=self.error,
                model=ModelRef(id=model_id_for(self.settings.model), path=self.settings.model)
                if self.settings
                else None,
                settings=self.settings,
                memory=MemoryFigures(
                    weights=mem.weights, kv=mem.kv, compute=mem.compute, total=mem.total
                )
                if mem
                else MemoryFigures(),
                speculative=SpeculativeStatus(
                    drafter=decoder.last_drafter if decoder else None,
                    acceptance=ctl.acceptance_rate if ctl else None,
                    n_draft=ctl.current_k if ctl else 0,
                    draft_model=model_id_for(draft.request.model) if draft else None,
                    draft_acceptance=ctl.acceptance_of(by_model) if ctl and by_model else None,
                    mtp_heads=model.mtp_heads if model else 0,
                    mtp_unavailable=model.mtp_reason if model and model.mtp is None else None,
                ),
                runtime=self.runtime,
                queue=QueueInfo(waiting=self._live_waiting(), limit=self.queue_limit),
                slots=[_slot_status(slot) for slot in decoder.slots] if decoder else [],
                tool_format=self._tool_status(),
            )

    def _tool_status(self) -> ToolFormatStatus | None:
        fmt, test = self.tool_format, self.tool_self_test
        if fmt is None:
            return None
        return ToolFormatStatus(
            name=fmt.name,
            self_test=test[0] if test else None,
            detail=test[1] if test else None,
        )

    def health(self) -> str:
        with self._lock:
            if self.state == "loading":
                return "loading"
            if self.state == "error":
                return "error"
            return "ok"


def _draft_placement(request: LoadRequest) -> tuple[int, list[float] | None]:
    """Where the draft model goes: whole onto the device that holds the model's
    output head (as the planner counts it, engine/planning/planner.py): the
    last GPU the model's layers are split over when any are offloaded, else
    the host. Returns the draft's n_gpu_layers and tensor split."""
    if request.n_gpu_layers == 0:
        return 0, None
    split = request.tensor_split
    if not split or not any(f > 0 for f in split):
        return -1, None  # one GPU (or llama.cpp's own split): the draft follows its default
    last = max(i for i, f in enumerate(split) if f > 0)
    return -1, [1.0 if i == last else 0.0 for i in range(len(split))]


def _slot_status(slot: Slot) -> SlotStatus:
    """A slot as status shows it (read from another thread: a snapshot, not a lock)."""
    request = slot.request
    return SlotStatus(
        id=slot.seq,
        state=slot.state.value,
        age_s=round(slot.age_s, 3) if request is not None else 0.0,
        n_prompt=len(request.prompt_tokens) if request is not None else 0,
        n_cached=slot.timings.cache_n if request is not None else 0,
        n_generated=slot.generated if request is not None else 0,
        n_ctx_used=len(slot.tokens),
    )
