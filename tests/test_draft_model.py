"""The draft-model path on scripted fake models: cost, failures, loading, vocabulary.

Each test reproduces a fault found in review (docs/architecture.md,
"Speculation"): a polluted cost estimate, a draft cache left out of step by a
failed multi-chunk evaluation, a draft failure failing the request, a draft
model leaked by a failed load, and a draft of another vocabulary.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.backend.llama import BatchPart, DecodeError, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.serving.scheduler import Done, Engine, Job, JobEvent, PromptSpec
from engine.speculative.drafters import NgramDrafter
from engine.wire.control import LoadRequest
from tests.fake_model import EOG, FakeModel, Script, answer_after

GREEDY = SamplingParams(temperature=0.0)
DRAFT = SpecParams(type="draft", n_max=4, n_min=4)
MS_PER_TOKEN = 1.0  # what the fake draft model takes per evaluated token


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeDraftModel(FakeModel):
    """A fake model that takes `MS_PER_TOKEN` of the clock per token, and can fail.

    `fail_after` makes the next evaluation of more than one token fail halfway,
    after its first chunk went into the cache: what llama.cpp leaves behind when
    a later chunk of a multi-chunk decode fails.
    """

    def __init__(self, script: Script, clock: Clock, **kwargs: object) -> None:
        super().__init__(script, **kwargs)  # type: ignore[arg-type]
        self.clock = clock
        self.fail_next_chunked = False
        self.fail_always = False
        self.cleared = 0
        self.ms_per_token = MS_PER_TOKEN

    def decode(
        self, seq: int, tokens: Sequence[int], pos0: int, *, logits_all: bool = False
    ) -> float:
        if self.fail_always:
            raise DecodeError("llama_decode failed (-3)")
        if self.fail_next_chunked and len(tokens) > 1:
            self.fail_next_chunked = False
            half = len(tokens) // 2
            super().decode(seq, tokens[:half], pos0)
            raise DecodeError("llama_decode failed (-3)")
        self.clock.now += self.ms_per_token * len(tokens) / 1000.0
        return super().decode(seq, tokens, pos0, logits_all=logits_all)

    def clear(self) -> None:
        self.cleared += 1
        super().clear()


class GpuLikeModel(FakeModel):
    """A fake target whose batches of up to 16 rows cost what one row does (a GPU's
    verify), so that drafting can pay and the controller is free to choose it."""

    def decode_batch(self, parts: Sequence[BatchPart]) -> float:
        super().decode_batch(parts)
        return 10.0


def setup(
    prompt: list[int], answer: list[int], *, n_ctx: int = 2048, gpu_like: bool = False
) -> tuple[FakeModel, FakeDraftModel, Decoder, Clock]:
    from engine.speculative.drafters import DraftModelDrafter

    clock = Clock()
    kind = GpuLikeModel if gpu_like else FakeModel
    model = kind(answer_after(prompt, answer), n_ctx=n_ctx, n_batch=64)
    draft = FakeDraftModel(answer_after(prompt, answer), clock, n_ctx=n_ctx, n_batch=64)
    drafter = DraftModelDrafter(draft, clock=clock)
    decoder = Decoder(
        model, state_cache=PrefixStateCache(0), drafters=[NgramDrafter(), drafter], clock=clock
    )
    if gpu_like:
        for n in range(1, 18):  # as if measured: the controller's CPU prior would not draft
            decoder.controller.record_cost(n, 10.0)
    return model, draft, decoder, clock


def generate(decoder: Decoder, prompt: list[int], spec: SpecParams = DRAFT) -> GenerationResult:
    req = GenerationRequest(prompt, GREEDY, 40, speculative=spec)
    return decoder.generate(req, lambda _text: None)


def test_the_draft_cost_is_measured_on_drafting_not_on_reading_the_prompt() -> None:
    # A new chat of 1,000 prompt tokens: before the fix the first draft also
    # read the whole prompt into the draft model, and 1,000 tokens over 4
    # drafts looked 250 times dearer than drafting is.
    prompt = [1 + i % 50 for i in range(1000)]
    answer = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, EOG]
    _model, draft, decoder, _clock = setup(prompt, answer)
    result = generate(decoder, prompt)
    assert result.text == "ghijklmnop"
    assert result.timings.draft_n_accepted == result.timings.draft_n > 0
    drafter = decoder.drafters[1]
    ctl = decoder.controller
    # The fake target takes 10 ms per token; the draft 1 ms per token.
    assert ctl.draft_cost(drafter=drafter) < 0.3
    # The prompt went into the draft model during prompt processing, in
    # batches, and its time was kept apart.
    assert getattr(drafter, "prefill_ms", 0.0) == pytest.approx(999 * MS_PER_TOKEN)
    prompt_batches = [d for d in draft.decodes if len(d[1]) > 1]
    assert len(prompt_batches) >= 1000 // 64 and max(len(d[1]) for d in prompt_batches) <= 64
    assert draft.kv[0][: len(prompt)] == prompt
    # That time is prompt time (before the first token), not generation time.
    assert result.timings.prompt_ms == pytest.approx(999 * MS_PER_TOKEN)
    assert result.timings.predicted_ms < 100


def test_cancel_during_the_draft_prefill_ends_the_request() -> None:
    prompt = [1 + i % 50 for i in range(1000)]
    _model, draft, decoder, _clock = setup(prompt, [7, 8, 9, EOG])
    cancel = threading.Event()
    batches = 0

    def count() -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            cancel.set()

    draft.on_decode = count
    req = GenerationRequest(prompt, GREEDY, 40, speculative=DRAFT, cancel=cancel)
    result = decoder.generate(req, lambda _text: None)
    assert result.finish_reason == "cancelled"
    assert batches == 3  # the draft prefill stopped at the next batch


def test_a_failed_chunked_draft_evaluation_costs_only_speculation_for_that_request() -> None:
    prompt = [1 + i % 50 for i in range(300)]
    answer = [7, 8, 9, 10, 11, 12, 13, 14, EOG]
    _model, draft, decoder, _clock = setup(prompt, answer)
    draft.fail_next_chunked = True  # the draft's prompt evaluation fails halfway
    first = generate(decoder, prompt)
    # The request itself is answered, without drafts.
    assert first.text == "ghijklmn" and first.finish_reason == "stop"
    assert first.timings.draft_n == 0
    # The drafter's sequence was emptied, not left holding half a prompt (only
    # its own: other slots' drafts share the draft model).
    assert draft.kv[0] == [] and draft.cleared == 0
    # The next request drafts again, from a cache in step with the drafter.
    second = generate(decoder, [*prompt[:-1], 3])
    decoder.drop_context()
    third = generate(decoder, prompt)
    assert third.text == first.text
    assert third.timings.draft_n_accepted == third.timings.draft_n > 0
    drafter = decoder.drafters[1]
    assert draft.kv[0] == drafter._in_kv
    assert second.finish_reason in ("stop", "length")


def test_a_draft_failure_while_drafting_turns_speculation_off_for_the_request_only() -> None:
    prompt = [1, 2, 3, 4, 5, 6]
    answer = [7, 8, 9, 10, 11, 12, 13, 14, EOG]
    _model, draft, decoder, _clock = setup(prompt, answer)
    calls = 0

    def fail_on_the_first_draft() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # 1: the prompt; 2: the first draft (catching up first)
            raise DecodeError("llama_decode failed (-3)")

    draft.on_decode = fail_on_the_first_draft
    result = generate(decoder, prompt)
    assert result.text == "ghijklmn" and result.finish_reason == "stop"
    assert result.timings.draft_n == 0
    assert draft.kv[0] == []  # emptied, so nothing stale is trusted later
    assert decoder.drafters[1].name == "draft"  # still in the chain for the next request
    draft.on_decode = None
    decoder.drop_context()
    again = generate(decoder, prompt)
    assert again.text == result.text and again.timings.draft_n_accepted > 0


# --- loading -----------------------------------------------------------------------------


class TemplatedFake(FakeModel):
    template: str | None = None

    def meta(self, key: str) -> str | None:
        return self.template if key == "tokenizer.chat_template" else None


def run_load(
    request: LoadRequest, make: dict[str, TemplatedFake]
) -> tuple[Engine, list[TemplatedFake]]:
    loaded: list[TemplatedFake] = []

    def factory(req: LoadRequest, *, progress: object = None) -> TemplatedFake:
        model = make[req.model]
        model.request = req
        loaded.append(model)
        return model

    engine = Engine(model_factory=factory)
    assert engine.load(request).wait(10)
    return engine, loaded


def test_a_failed_load_closes_the_draft_model_it_had_loaded() -> None:
    script = answer_after([1], [EOG])
    target, draft = TemplatedFake(script), TemplatedFake(script)
    target.template = "{% for %}"  # refused when the template is compiled
    engine, loaded = run_load(
        LoadRequest(model="t.gguf", draft_model="d.gguf"), {"t.gguf": target, "d.gguf": draft}
    )
    try:
        status = engine.status()
        assert status.state == "error" and status.error
        assert loaded == [target, draft]
        assert target.closed and draft.closed
        assert engine.draft_model is None
    finally:
        engine.shutdown()


def test_a_draft_model_of_another_vocabulary_is_refused_and_closed() -> None:
    script = answer_after([1], [EOG])
    target, draft = TemplatedFake(script), TemplatedFake(script)
    draft.vocab_fingerprint = lambda: "another vocabulary"  # type: ignore[method-assign]
    engine, _ = run_load(
        LoadRequest(model="t.gguf", draft_model="d.gguf"), {"t.gguf": target, "d.gguf": draft}
    )
    try:
        status = engine.status()
        assert status.state == "error"
        assert status.error is not None and "vocabulary differs" in status.error
        assert target.closed and draft.closed
    finally:
        engine.shutdown()


def test_with_a_draft_model_the_engine_drafts_through_it() -> None:
    prompt = [1, 2, 3, 4]
    script = answer_after(prompt, [5, 6, 7, 8, 9, 10, EOG])
    target, draft = TemplatedFake(script), TemplatedFake(script)
    engine, _ = run_load(
        LoadRequest(model="t.gguf", draft_model="d.gguf"), {"t.gguf": target, "d.gguf": draft}
    )
    try:
        assert engine.status().state == "ready"
        assert "draft" in engine.drafter_names
        done = threading.Event()
        events: list[JobEvent] = []

        def emit(event: JobEvent) -> None:
            events.append(event)
            if isinstance(event, Done):
                done.set()

        engine.submit(Job(PromptSpec(token_ids=prompt), GREEDY, None, [], DRAFT, emit))
        assert done.wait(10)
        last = events[-1]
        assert isinstance(last, Done) and last.result is not None
        assert last.result.text == "efghij"
        assert last.result.timings.draft_n_accepted > 0
        spec = engine.status().speculative
        assert spec.drafter == "draft"
        # Status names the draft model in use and how many of its drafts were accepted.
        assert spec.draft_model == "d"
        assert spec.draft_acceptance == 1.0
    finally:
        engine.shutdown()
    assert target.closed and draft.closed


# --- --draft-model auto ------------------------------------------------------------------


def library_with_a_draft(folder: Path, target: Path) -> Path:
    """A models folder holding a small GGUF with the target's token list and one without."""
    from engine.gguf.header import read_gguf_header
    from tests.gguf_fixtures import tiny_model

    folder.mkdir()
    tokens = read_gguf_header(target).get("tokenizer.ggml.tokens")
    same = tiny_model(
        folder / "same-vocab.gguf",
        tokenizer__ggml__tokens=tokens,
        tokenizer__ggml__scores=None,
        tokenizer__ggml__token_type=None,
    )
    tiny_model(folder / "other-vocab.gguf")
    return same


def test_auto_finds_the_library_model_with_the_exact_vocabulary(
    tmp_path: Path, default_model: Path
) -> None:
    from engine.serving.draft_pairing import find_draft

    same = library_with_a_draft(tmp_path / "models", default_model)
    assert find_draft(default_model, [tmp_path / "models", tmp_path / "missing"]) == same
    # The target itself, or a model as large as it, is never its own draft.
    assert find_draft(same, [tmp_path / "models"]) is None


def serve_auto(
    tmp_path: Path, default_model: Path, draft_answer: list[int]
) -> tuple[Engine, TemplatedFake, list[int]]:
    library = tmp_path / "models"
    same = library_with_a_draft(library, default_model)
    prompt = [1, 2, 3, 4]
    answer = [5 + i % 20 for i in range(30)] + [EOG]
    target = TemplatedFake(answer_after(prompt, answer))
    draft = TemplatedFake(answer_after(prompt, draft_answer))
    files = {str(default_model): target, str(same): draft}

    def factory(req: LoadRequest, *, progress: object = None) -> TemplatedFake:
        model = files[req.model]
        model.request = req
        return model

    engine = Engine(model_factory=factory, draft_folders=[library])
    assert engine.load(LoadRequest(model=str(default_model), draft_model="auto")).wait(10)
    return engine, draft, prompt


def ask(engine: Engine, prompt: list[int]) -> GenerationResult:
    done = threading.Event()
    events: list[JobEvent] = []

    def emit(event: JobEvent) -> None:
        events.append(event)
        if isinstance(event, Done):
            done.set()

    engine.submit(Job(PromptSpec(token_ids=prompt), GREEDY, None, [], DRAFT, emit))
    assert done.wait(10)
    last = events[-1]
    assert isinstance(last, Done) and last.result is not None, last
    return last.result


def test_auto_keeps_a_draft_model_that_pays(tmp_path: Path, default_model: Path) -> None:
    good = [5 + i % 20 for i in range(30)] + [EOG]
    engine, draft, prompt = serve_auto(tmp_path, default_model, good)
    try:
        assert engine.status().speculative.draft_model == "same-vocab"
        for _ in range(4):
            assert ask(engine, prompt).timings.draft_n_accepted > 0
        spec = engine.status().speculative
        assert spec.draft_model == "same-vocab" and spec.draft_acceptance == 1.0
        assert engine._trial is None  # decided: kept
        assert not draft.closed
    finally:
        engine.shutdown()
    assert draft.closed


def test_auto_unloads_a_draft_model_that_measures_no_gain(
    tmp_path: Path, default_model: Path
) -> None:
    wrong = [40] * 30 + [EOG]  # never what the target says
    engine, draft, prompt = serve_auto(tmp_path, default_model, wrong)
    try:
        assert engine.status().speculative.draft_model == "same-vocab"
        texts = {ask(engine, prompt).text for _ in range(8)}
        assert len(texts) == 1  # the answers never depended on the draft
        assert draft.closed
        spec = engine.status().speculative
        assert spec.draft_model is None and spec.draft_acceptance is None
        assert engine.drafter_names == ["ngram"]
        assert ask(engine, prompt).text in texts  # and serving goes on without it
    finally:
        engine.shutdown()


def test_a_draft_model_that_does_not_pay_is_left_out_of_later_requests() -> None:
    # Keeping a draft model in step costs one of its evaluations per token, drafting
    # or not: before the fix it was probed every 16 tokens, each probe reading all
    # the tokens since the last, and such requests ran at 0.6 of plain decoding.
    prompt = [1 + i % 50 for i in range(200)]
    answer = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, EOG]
    _model, draft, decoder, _clock = setup(prompt, answer, gpu_like=True)
    draft.ms_per_token = 30.0  # three of the fake target's tokens per draft token
    judged = SpecParams(type="draft")  # n_min 0: the controller decides
    first = generate(decoder, prompt, judged)
    assert first.text == "ghijklmnop"
    drafter, ctl = decoder.drafters[1], decoder.controller
    assert 0 < first.timings.draft_n <= 8  # one draft of at most n_max measures it; then left
    assert not ctl.pays(drafter)
    read = len(draft.decodes)
    second = generate(decoder, prompt, judged)
    assert second.text == first.text
    # Not taken at all: no drafts, and not even the prompt read into the draft model.
    assert second.timings.draft_n == 0 and len(draft.decodes) == read
    third = generate(decoder, prompt, judged)  # tried again after one request without it
    assert third.text == first.text and len(draft.decodes) > read
    # Drafts asked for (n_min) are not judged.
    forced = generate(decoder, prompt, DRAFT)
    assert forced.text == first.text and forced.timings.draft_n > 0


def test_a_draft_model_that_pays_keeps_drafting() -> None:
    prompt = [1 + i % 50 for i in range(200)]
    answer = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, EOG]
    # 1 ms a draft token against the target's 10.
    _model, _draft, decoder, _clock = setup(prompt, answer, gpu_like=True)
    judged = SpecParams(type="draft")
    for _ in range(3):
        result = generate(decoder, prompt, judged)
        assert result.text == "ghijklmnop" and result.timings.draft_n_accepted >= 8
    assert decoder.controller.pays(decoder.drafters[1])
