"""The decoding core on a scripted fake model: slots, drafts, rollback, cancel, prefix reuse.

No llama.cpp here: `tests/fake_model.py` answers a fixed script and checks the
decoder's KV bookkeeping on every call.
"""

from __future__ import annotations

import threading

import pytest

from engine.backend.llama import SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.decoding.slot import SlotState
from engine.serving.scheduler import Done, Engine, Job, JobEvent, PromptSpec, Started, TextDelta
from engine.speculative.drafters import Draft
from engine.wire.control import LoadRequest
from tests.fake_model import EOG, FakeModel, answer_after

GREEDY = SamplingParams(temperature=0.0)
PLAIN = SpecParams(type="none")


def forced(n: int) -> SpecParams:
    """n-gram drafts of exactly n tokens whenever a match has that many."""
    return SpecParams(type="ngram", n_max=n, n_min=n)


def generate(
    decoder: Decoder,
    prompt: list[int],
    spec: SpecParams,
    *,
    max_tokens: int = 40,
    stop: list[str] | None = None,
    cancel: threading.Event | None = None,
) -> tuple[GenerationResult, list[str]]:
    pieces: list[str] = []
    req = GenerationRequest(prompt, GREEDY, max_tokens, stop=stop or [], speculative=spec)
    if cancel is not None:
        req.cancel = cancel
    return decoder.generate(req, pieces.append), pieces


def assert_consistent(decoder: Decoder, model: FakeModel) -> None:
    slot = decoder.slots[0]
    assert slot.state is SlotState.IDLE
    assert slot.tokens == model.kv[slot.seq]
    assert all(s.closed for s in model.samplers)


def test_plain_decoding_follows_the_script_and_drafting_changes_nothing() -> None:
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    answer = [1, 2, 3, 4, 6, 7, 1, 2, 3, 4, 6, 7, EOG]
    model = FakeModel(answer_after(prompt, answer))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    plain, plain_pieces = generate(decoder, prompt, PLAIN)
    decoder.drop_context()
    drafted, drafted_pieces = generate(decoder, prompt, forced(3))
    assert plain.text == "abcdfgabcdfg" == "".join(plain_pieces)
    assert plain.finish_reason == "stop"
    assert plain.completion_tokens == len(answer)
    assert plain.timings.draft_n == 0
    assert drafted.text == plain.text and drafted_pieces == plain_pieces
    assert drafted.completion_tokens == plain.completion_tokens
    assert drafted.timings.draft_n > drafted.timings.draft_n_accepted > 0
    assert decoder.last_drafter == "ngram"
    assert_consistent(decoder, model)


def test_end_of_generation_inside_an_accepted_draft() -> None:
    # The prompt holds an earlier answer ending in EOG (a chat turn's end): the
    # n-gram drafter copies it, EOG included, and the target accepts it all.
    prompt = [9, 1, 2, 3, 4, EOG, 9]
    answer = [1, 2, 3, 4, EOG]
    model = FakeModel(answer_after(prompt, answer))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    result, pieces = generate(decoder, prompt, forced(4))
    assert result.text == "abcd" == "".join(pieces)
    assert result.finish_reason == "stop"
    assert result.completion_tokens == 5  # EOG counts, as in plain decoding
    # The draft [2, 3, 4, EOG] was verified and accepted whole, EOG inside it.
    assert model.decodes[-1] == (0, [1, 2, 3, 4, EOG], len(prompt))
    assert result.timings.draft_n_accepted == 4
    assert_consistent(decoder, model)


def test_a_refused_rollback_fails_the_request_and_the_next_starts_clean() -> None:
    prompt = [1, 2, 3, 4, 1, 2]
    answer = [5, 1, 2, 6, 7, EOG]  # after "1 2" the drafter proposes "5 1": rejected
    model = FakeModel(answer_after(prompt, answer))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    model.refuse_truncate = True
    with pytest.raises(RuntimeError, match="refused to roll back"):
        generate(decoder, prompt, forced(2))
    assert decoder.slots[0].tokens == [] == model.kv[0]  # nothing is trusted after it
    assert all(s.closed for s in model.samplers)
    model.refuse_truncate = False
    result, _ = generate(decoder, prompt, forced(2))
    assert result.timings.cache_n == 0
    assert result.text == "eabfg"
    assert result.timings.draft_n > result.timings.draft_n_accepted
    assert_consistent(decoder, model)


def test_a_stop_string_across_a_draft_boundary_is_never_streamed() -> None:
    # Token 4 renders "XY", token 5 "Z!": the stop string "YZ" starts in the last
    # accepted draft token and ends in the token sampled after the verify batch.
    pieces_map = {4: b"XY", 5: b"Z!"}
    prompt = [1, 2, 3, 4, 5, 9]
    answer = [1, 2, 3, 4, 5, 6, EOG]
    model = FakeModel(answer_after(prompt, answer), pieces=pieces_map)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    result, pieces = generate(decoder, prompt, forced(2), stop=["YZ"])
    assert result.text == "abcX" == "".join(pieces)
    assert result.finish_reason == "stop"
    # The verify batch [2, 3, 4] ended the draft at "XY".
    assert (0, [2, 3, 4], len(prompt) + 1) in model.decodes
    assert result.timings.draft_n_accepted == 2
    assert_consistent(decoder, model)


def test_cancel_between_prompt_batches_keeps_what_was_evaluated() -> None:
    prompt = list(range(1, 11))
    model = FakeModel(answer_after(prompt, [11, 12, EOG]), n_batch=4)
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    cancel = threading.Event()
    model.on_decode = cancel.set  # the client goes away during the first batch
    result, pieces = generate(decoder, prompt, PLAIN, cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.text == "" and pieces == []
    assert result.completion_tokens == 0
    assert [d[1] for d in model.decodes] == [[1, 2, 3, 4]]
    assert_consistent(decoder, model)
    # The batch that was evaluated is reused by the next request.
    model.on_decode = None
    again, _ = generate(decoder, prompt, PLAIN)
    assert again.timings.cache_n == 4
    assert again.text == "kl"


def test_cancel_between_generated_tokens() -> None:
    prompt = [1, 2, 3]
    model = FakeModel(answer_after(prompt, [4, 5, 6, 7, 8, EOG]))
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 2:
            cancel.set()

    req = GenerationRequest(prompt, GREEDY, 40, speculative=PLAIN, cancel=cancel)
    result = decoder.generate(req, on_text)
    assert result.finish_reason == "cancelled"
    assert result.text == "de"
    assert_consistent(decoder, model)


def test_a_prefix_cache_restore_followed_by_a_rejected_draft() -> None:
    # Two long chats. Chat X repeats "10 11 12 13", but its answer goes "10 11 14":
    # the first draft after the restore is rejected and rolled back.
    x = [20 + i % 7 for i in range(40)] + [10, 11, 12, 13, 30, 10, 11, 12, 13, 31]
    y = [40 + i % 5 for i in range(45)]
    x_answer = [10, 11, 14, 15, 10, 11, 14, 15, EOG]

    def script(context: list[int] | tuple[int, ...]) -> int:
        if list(context[: len(x)]) == x:
            return answer_after(x, x_answer)(context)
        return answer_after(y, [1, 2, 3, EOG])(context)

    fresh_model = FakeModel(script)
    want, _ = generate(Decoder(fresh_model, state_cache=PrefixStateCache(0)), x, forced(2))

    model = FakeModel(script)
    cache = PrefixStateCache(1 << 20)
    decoder = Decoder(model, state_cache=cache)
    generate(decoder, x, forced(2))
    generate(decoder, y, forced(2))  # a switch: X's state is saved
    assert len(cache) == 1
    again, _ = generate(decoder, x, forced(2))  # X is restored, not re-read
    assert cache.hits == 1
    assert again.timings.cache_n == len(x) - 1
    assert again.timings.draft_n > again.timings.draft_n_accepted  # a draft was rejected
    assert again.text == want.text == "jkno" * 2
    assert again.completion_tokens == want.completion_tokens
    assert_consistent(decoder, model)


def test_the_chain_is_asked_in_order_and_a_costly_drafter_only_for_what_pays() -> None:
    class Scripted:
        """A costly drafter that always proposes the right tokens."""

        name = "draft"
        cheap = False

        def __init__(self, answer: list[int]) -> None:
            self.answer = answer
            self.history: list[int] = []
            self.asked: list[int] = []
            self.n_prompt = 0
            self.closed = False

        def prior(self, strength: int) -> float:
            return 0.7

        def reset(self, tokens: list[int]) -> None:
            self.history = list(tokens)
            self.n_prompt = len(tokens)

        def extend(self, tokens: list[int]) -> None:
            self.history.extend(tokens)

        def propose(self, k: int) -> Draft:
            self.asked.append(k)
            done = len(self.history) - self.n_prompt
            return Draft(self.answer[done : done + k], cost_ms=1.0 * k)

        def close(self) -> None:
            self.closed = True

    prompt = [1, 2, 3]
    answer = [4, 5, 6, 7, 8, 9, 10, 11, EOG]
    model = FakeModel(answer_after(prompt, answer))
    from engine.speculative.drafters import NgramDrafter

    drafter = Scripted(answer)
    decoder = Decoder(model, state_cache=PrefixStateCache(0), drafters=[NgramDrafter(), drafter])
    result, _ = generate(decoder, prompt, SpecParams(type="draft", n_max=3, n_min=3))
    assert result.text == "defghijk"
    assert drafter.asked and all(k == 3 for k in drafter.asked[:-1])
    assert result.timings.draft_n_accepted == result.timings.draft_n > 0
    assert decoder.last_drafter == "draft"
    decoder.close()
    assert drafter.closed


def test_the_engine_runs_an_injected_model_and_sends_typed_events() -> None:
    prompt = [1, 2, 3]
    models: list[FakeModel] = []

    def factory(request: LoadRequest, *, progress: object = None) -> FakeModel:
        models.append(FakeModel(answer_after(prompt, [8, 9, EOG]), request=request))
        return models[-1]

    engine = Engine(model_factory=factory)
    try:
        assert engine.load(LoadRequest(model="fake.gguf")).wait(10)
        assert engine.status().state == "ready"
        events: list[JobEvent] = []
        finished = threading.Event()

        def emit(event: JobEvent) -> None:
            events.append(event)
            if isinstance(event, Done):
                finished.set()

        engine.submit(
            Job(
                prompt=PromptSpec(token_ids=prompt),
                sampling=GREEDY,
                max_tokens=None,
                stop=[],
                speculative=PLAIN,
                emit=emit,
            )
        )
        assert finished.wait(10)
        assert events[0] == Started(n_prompt=3, granted=models[0].n_ctx - 3)
        assert events[1:3] == [TextDelta("h"), TextDelta("i")]
        done = events[-1]
        assert isinstance(done, Done) and done.error is None and done.result is not None
        assert done.result.text == "hi" and done.result.finish_reason == "stop"
    finally:
        engine.shutdown()
    assert models[0].closed


def test_a_length_cut_inside_a_character_drops_its_bytes_instead_of_sending_u_fffd() -> None:
    prompt = [1, 2, 3]
    model = FakeModel(answer_after(prompt, [1, 40, 41, 2]))
    # Token 40 is the first two bytes of "🦜" (four bytes), token 41 the other two.
    parrot = "🦜".encode()
    model.pieces = {40: parrot[:2], 41: parrot[2:]}
    decoder = Decoder(model, state_cache=PrefixStateCache(0))
    whole, _ = generate(decoder, prompt, PLAIN, max_tokens=3)
    assert whole.text == "a🦜" and whole.finish_reason == "length"
    decoder.drop_context()
    cut, pieces = generate(decoder, prompt, PLAIN, max_tokens=2)
    assert cut.text == "a" == "".join(pieces)
    assert cut.finish_reason == "length"
