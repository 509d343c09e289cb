"""Parallel slots on the scripted fake model: one batch per step, chunked prefill,
a full shared cache, cancellation, and the engine's admission order and queue.

No llama.cpp here (tests/fake_model.py checks every sequence's bookkeeping);
the real engine over HTTP is in tests/test_batching_engine.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from engine.backend.llama import ContextFull, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, SpecParams
from engine.decoding.slot import Slot, SlotState
from engine.errors import PeregrineError
from engine.serving.scheduler import Done, Engine, Job, JobEvent, PromptSpec, QueueFull, Started
from engine.wire.control import LoadRequest
from tests.fake_model import EOG, FakeModel, Script

GREEDY = SamplingParams(temperature=0.0)
PLAIN = SpecParams(type="none")


def echo_script(context: Sequence[int]) -> int:
    """Each sequence answers its prompt's first token, counting up, then ends."""
    first = context[1] if len(context) > 1 else 1
    n = len(context)
    return EOG if n > 40 else 1 + (first + n) % 60


def request(
    prompt: list[int], *, max_tokens: int = 12, spec: SpecParams = PLAIN
) -> GenerationRequest:
    return GenerationRequest(prompt, GREEDY, max_tokens, speculative=spec)


def run_all(decoder: Decoder, slots: list[Slot]) -> int:
    steps = 0
    while any(
        s.state in (SlotState.PREFILL, SlotState.GENERATING, SlotState.PARKED) for s in slots
    ):
        decoder.step()
        steps += 1
    return steps


def solo(
    script: Script,
    prompt: list[int],
    spec: SpecParams = PLAIN,
    n_ctx: int = 256,
    max_tokens: int = 12,
) -> str:
    model = FakeModel(script, n_seq_max=1, n_ctx=n_ctx, n_batch=512)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    return decoder.generate(request(prompt, spec=spec, max_tokens=max_tokens), lambda _t: None).text


@pytest.mark.parametrize("spec", [PLAIN, SpecParams(type="ngram", n_max=4, n_min=4)])
def test_slots_share_each_step_and_each_gets_its_solo_answer(spec: SpecParams) -> None:
    model = FakeModel(echo_script, n_seq_max=4, n_batch=64)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    prompts = [[9, 1 + i, 2, 3, 1 + i, 2, 3] for i in range(4)]
    texts: list[list[str]] = [[] for _ in prompts]
    slots = [decoder.admit(request(p, spec=spec), texts[i].append) for i, p in enumerate(prompts)]
    assert sorted(s.seq for s in slots) == [0, 1, 2, 3]
    run_all(decoder, slots)
    for i, slot in enumerate(slots):
        assert slot.error is None
        assert slot.result().text == "".join(texts[i]) == solo(echo_script, prompts[i], spec)
        assert slot.tokens == model.kv[slot.seq]
        slot.release()
    # One llama_decode per step carried every slot's rows.
    assert max(len(b) for b in model.batches) == 4
    assert len(model.batches) < 4 * 13


def test_a_long_prefill_delays_a_short_request_by_at_most_one_chunk() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=2048, n_batch=512)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    long_slot = decoder.admit(request([7] * 1500, max_tokens=2), lambda _t: None)
    decoder.step()  # alone: a whole n_batch chunk, which measures a prompt token's cost
    assert len(model.batches[-1][0].tokens) == 512
    short = decoder.admit(request([3, 4, 5], max_tokens=2), lambda _t: None)
    decoder.step()  # the next step already takes the short prompt, beside a chunk
    assert short.state is SlotState.GENERATING
    assert long_slot.state is SlotState.PREFILL
    parts = {p.seq: len(p.tokens) for p in model.batches[-1]}
    assert parts[short.seq] == 3
    # With another stream in the step, chunks are sized by time (the fake's
    # cost: ~9 ms a token): about 250 ms each.
    assert 16 <= parts[long_slot.seq] < 40
    decoder.step()
    assert 16 <= len(model.batches[-1][-1].tokens) < 40
    run_all(decoder, [long_slot, short])
    assert long_slot.result().text == solo(echo_script, [7] * 1500, n_ctx=2048, max_tokens=2)


def test_a_prompt_alone_goes_in_chunks_sized_by_time_once_a_token_is_measured() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=4096, n_batch=512)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    slot = decoder.admit(request([7] * 3000, max_tokens=2), lambda _t: None)
    decoder.step()  # unmeasured: a whole n_batch chunk
    assert len(model.batches[-1][0].tokens) == 512
    decoder.step()  # alone, yet about 250 ms (the fake: ~9 ms a token)
    assert 16 <= len(model.batches[-1][0].tokens) < 40
    run_all(decoder, [slot])
    assert slot.result().text == solo(echo_script, [7] * 3000, n_ctx=4096, max_tokens=2)


def test_a_full_shared_cache_parks_the_newest_request_in_host_ram_and_resumes_it() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=64, kv_cells=70)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    old = decoder.admit(request([5] * 20, max_tokens=30), lambda _t: None)
    decoder.step()
    young_text: list[str] = []
    young = decoder.admit(request([6] * 20, max_tokens=30), young_text.append)
    seen: list[SlotState] = []
    free_while_parked: set[int] = set()
    while any(s.state is not SlotState.DONE for s in (old, young)):
        decoder.step()
        seen.append(young.state)
        if young.state is SlotState.PARKED:
            assert model.kv[young.seq] == []  # its cells were given back
            free_while_parked.add(decoder.free_slots)
    assert SlotState.PARKED in seen
    assert free_while_parked == {0}  # nothing new is admitted while one waits
    # Both ran to their natural end, each with its solo answer: nothing was cut or repeated.
    assert old.error is None and young.error is None
    assert old.result().text == solo(echo_script, [5] * 20, max_tokens=30)
    assert young.result().text == "".join(young_text) == solo(echo_script, [6] * 20, max_tokens=30)
    assert young.result().finish_reason == "stop"


def test_a_parked_request_that_is_cancelled_ends_as_cancelled() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=64, kv_cells=70)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    old = decoder.admit(request([5] * 20, max_tokens=30), lambda _t: None)
    decoder.step()
    young = decoder.admit(request([6] * 20, max_tokens=30), lambda _t: None)
    while young.state is not SlotState.PARKED:
        decoder.step()
    assert young.request is not None
    young.request.cancel.set()
    finished = decoder.step()
    assert young in finished and young.result().finish_reason == "cancelled"
    young.release()
    run_all(decoder, [old])
    assert old.result().text == solo(echo_script, [5] * 20, max_tokens=30)


def test_a_request_alone_on_a_full_cache_ends_with_a_clear_error() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=64, kv_cells=40)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    slot = decoder.admit(request([5] * 20, max_tokens=30), lambda _t: None)
    run_all(decoder, [slot])
    assert isinstance(slot.error, ContextFull)
    assert "fewer parallel slots" in str(slot.error)
    assert model.kv[slot.seq] == [] and slot.tokens == []


def test_idle_slots_give_up_their_cached_tokens_before_a_request_is_ended() -> None:
    model = FakeModel(echo_script, n_seq_max=2, n_ctx=64, kv_cells=64)
    decoder = Decoder(model, state_cache=PrefixStateCache(1 << 20))
    first = decoder.generate(request([5] * 30, max_tokens=3), lambda _t: None)
    assert first.finish_reason == "length" and len(decoder.slots[0].tokens) >= 30
    result = decoder.generate(request([6] * 30, max_tokens=30), lambda _t: None)
    assert result.finish_reason == "stop"  # ran to its end: the idle slot's cells were freed
    assert len(decoder.state_cache) == 1  # ... after being saved for a switch back


def test_cancel_frees_the_slot_within_one_step() -> None:
    model = FakeModel(echo_script, n_seq_max=2)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    cancel = threading.Event()
    req = request([1, 2, 3], max_tokens=30)
    req.cancel = cancel
    slot = decoder.admit(req, lambda _t: None)
    other = decoder.admit(request([4, 5, 6], max_tokens=30), lambda _t: None)
    decoder.step()
    decoder.step()
    cancel.set()
    finished = decoder.step()
    assert finished == [slot] and slot.result().finish_reason == "cancelled"
    slot.release()
    assert decoder.free_slots == 1 and other.state is SlotState.GENERATING


def test_a_new_request_takes_the_free_slot_with_the_longest_common_prefix() -> None:
    model = FakeModel(echo_script, n_seq_max=3)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [9, 10, 11, 12, 13, 14, 15, 16]
    slots = [decoder.admit(request(p, max_tokens=2), lambda _t: None) for p in (a, b)]
    run_all(decoder, slots)
    for s in slots:
        s.release()
    follow_up = decoder.admit(request([*b, 17, 18], max_tokens=2), lambda _t: None)
    assert follow_up.seq == slots[1].seq
    assert follow_up.timings.cache_n == len(b)


# --- the engine: admission order, queue, unload ------------------------------------


class Gate:
    """Holds the fake model's decodes until opened: requests pile up in the queue."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def __call__(self) -> None:
        assert self.open.wait(10)


def make_engine(n_parallel: int, gate: Gate, queue_limit: int = 64) -> Engine:
    def factory(req: LoadRequest, *, progress: object = None) -> FakeModel:
        model = FakeModel(echo_script, n_seq_max=req.n_parallel, request=req)
        model.on_decode = gate
        return model

    engine = Engine(model_factory=factory, queue_limit=queue_limit)
    assert engine.load(LoadRequest(model="fake.gguf", n_parallel=n_parallel)).wait(10)
    return engine


def job(prompt: list[int], events: list[tuple[int, JobEvent]], tag: int, **kw: object) -> Job:
    return Job(
        prompt=PromptSpec(token_ids=prompt),
        sampling=GREEDY,
        max_tokens=4,
        stop=[],
        speculative=PLAIN,
        emit=lambda e: events.append((tag, e)),
        **kw,  # type: ignore[arg-type]
    )


def test_the_apps_requests_are_admitted_ahead_of_queued_api_requests() -> None:
    gate = Gate()
    engine = make_engine(1, gate)
    events: list[tuple[int, JobEvent]] = []
    try:
        engine.submit(job([1, 2], events, 0))  # takes the one slot, held by the gate
        assert _wait(lambda: any(isinstance(e, Started) for _t, e in events))
        for tag in (1, 2):
            engine.submit(job([1, 2], events, tag))
        engine.submit(job([1, 2], events, 3, priority="app"))
        status = engine.status()
        assert status.queue.waiting == 3
        assert [s.state for s in status.slots] == ["prefill"]
        gate.open.set()
        assert _wait(lambda: sum(isinstance(e, Done) for _t, e in events) == 4)
        started = [t for t, e in events if isinstance(e, Started)]
        assert started == [0, 3, 1, 2]
    finally:
        gate.open.set()
        engine.shutdown()


def test_the_queue_counts_live_requests_and_refuses_at_once_when_full() -> None:
    gate = Gate()
    engine = make_engine(1, gate, queue_limit=2)
    events: list[tuple[int, JobEvent]] = []
    try:
        engine.submit(job([1, 2], events, 0))
        assert _wait(lambda: any(isinstance(e, Started) for _t, e in events))
        gone = job([1, 2], events, 1)
        engine.submit(gone)
        engine.submit(job([1, 2], events, 2))
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            engine.submit(job([1, 2], events, 3))
        gone.cancel.set()  # its client left: it no longer counts
        assert engine.status().queue.waiting == 1
        engine.submit(job([1, 2], events, 4))
        gate.open.set()
        assert _wait(lambda: sum(isinstance(e, Done) for _t, e in events) == 4)
        done = {t: e for t, e in events if isinstance(e, Done)}
        assert done[1].result is None and done[1].error is None  # dropped, never run
        assert all(done[t].result is not None for t in (0, 2, 4))
    finally:
        gate.open.set()
        engine.shutdown()


def test_unload_cancels_running_and_queued_requests() -> None:
    gate = Gate()
    engine = make_engine(1, gate)
    events: list[tuple[int, JobEvent]] = []
    try:
        engine.submit(job([1, 2], events, 0))
        assert _wait(lambda: any(isinstance(e, Started) for _t, e in events))
        engine.submit(job([1, 2], events, 1))
        unloaded = engine.unload()
        gate.open.set()
        assert unloaded.wait(10)
        done = {t: e for t, e in events if isinstance(e, Done)}
        assert done[0].result is not None and done[0].result.finish_reason == "cancelled"
        assert done[1].result is None and done[1].error is None
        assert engine.status().state == "idle"
    finally:
        gate.open.set()
        engine.shutdown()


def test_a_newer_load_replaces_a_queued_one() -> None:
    gate = Gate()
    engine = make_engine(1, gate)
    events: list[tuple[int, JobEvent]] = []
    try:
        engine.submit(job([1, 2], events, 0))
        assert _wait(lambda: any(isinstance(e, Started) for _t, e in events))
        first = engine.load(LoadRequest(model="first.gguf", n_parallel=2))
        second = engine.load(LoadRequest(model="second.gguf", n_parallel=3))
        assert first.wait(5)  # replaced before it ran
        gate.open.set()
        assert second.wait(10)
        status = engine.status()
        assert status.settings is not None and status.settings.model == "second.gguf"
        assert len(status.slots) == 3
    finally:
        gate.open.set()
        engine.shutdown()


def _wait(condition: object, timeout: float = 10.0) -> bool:
    from tests.engine_proc import wait_for

    assert callable(condition)
    return wait_for(condition, timeout)


def test_verify_rows_of_every_slot_fit_one_batch() -> None:
    # 4 slots wanting 1 + 4 rows each, in batches of 6 rows: drafts are cut to
    # fit, a slot without room waits a step, and every answer stays its solo one.
    model = FakeModel(echo_script, n_seq_max=4, n_batch=6)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    spec = SpecParams(type="ngram", n_max=4, n_min=4)
    prompts = [[9, 1 + i, 2, 3, 1 + i, 2, 3] for i in range(4)]
    slots = [decoder.admit(request(p, spec=spec), lambda _t: None) for p in prompts]
    run_all(decoder, slots)
    for slot, prompt in zip(slots, prompts, strict=True):
        assert slot.error is None
        assert slot.result().text == solo(echo_script, prompt, spec)
    assert max(sum(len(p.tokens) for p in b) for b in model.batches) <= 6


def test_a_newer_load_aborts_one_in_progress_through_its_progress_callback() -> None:
    entered = threading.Event()
    aborted = threading.Event()

    def factory(req: LoadRequest, *, progress: Any = None) -> FakeModel:
        if req.model == "slow.gguf":
            entered.set()
            for _ in range(1000):  # llama.cpp calls back while it reads the file
                if progress(0.5) is False:
                    aborted.set()
                    raise PeregrineError("llama.cpp could not load the model: slow.gguf")
                time.sleep(0.01)
        return FakeModel(echo_script, n_seq_max=req.n_parallel, request=req)

    engine = Engine(model_factory=factory)
    try:
        engine.load(LoadRequest(model="slow.gguf"))
        assert entered.wait(10)
        assert engine.load(LoadRequest(model="fast.gguf")).wait(10)
        assert aborted.is_set()
        status = engine.status()
        assert status.state == "ready" and status.error is None
        assert status.settings is not None and status.settings.model == "fast.gguf"
    finally:
        engine.shutdown()


def test_parallel_flag_takes_a_slot_count_or_auto() -> None:
    from engine.errors import UsageError
    from engine.serving.serve_cli import _parallel

    assert _parallel(None) is None
    assert _parallel("auto") == _parallel("-1") == 4
    assert _parallel("8") == 8
    for bad in ("0", "65", "many"):
        with pytest.raises(UsageError, match="--parallel takes a number of slots"):
            _parallel(bad)
