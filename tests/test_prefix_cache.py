"""Saved chat states: switching back must give the right chat, also at the edge of the budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.backend.llama import DecodeError, LlamaModel, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.gguf.chat_template import ChatTemplate
from engine.wire.control import LoadRequest

PLAIN = SpecParams(type="none")
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(default_model: Path) -> Iterator[LlamaModel]:
    # q8_0 KV: batch-invariant on the CPU, so "same answer" can be checked byte for byte.
    m = LlamaModel(
        LoadRequest(
            model=str(default_model),
            n_ctx=2048,
            flash_attn="on",
            threads=2,
            type_k="q8_0",
            type_v="q8_0",
        )
    )
    yield m
    m.close()


def chat(model: LlamaModel, secret: str) -> list[int]:
    filler = " ".join(f"Note {i}: the {secret} is kept in box {i}." for i in range(25))
    text = f"{filler}\nWhat is the secret word? It is {secret}. Repeat the secret word."
    rendered = ChatTemplate(model.meta("tokenizer.chat_template")).render(
        [{"role": "user", "content": text}]
    )
    return model.tokenize(rendered, add_special=False, parse_special=True)


def ask(decoder: Decoder, prompt: list[int]) -> GenerationResult:
    return decoder.generate(
        GenerationRequest(prompt, GREEDY, 12, speculative=PLAIN), lambda _t: None
    )


def test_switching_back_to_the_state_the_switch_itself_evicts(model: LlamaModel) -> None:
    x, y = chat(model, "PINEAPPLE"), chat(model, "TOMATO")
    assert len(x) > 250 and len(y) > 250
    fresh = Decoder(model, state_cache=PrefixStateCache(0))
    want_x, want_y = ask(fresh, x).text, ask(fresh, y).text
    assert want_x != want_y

    cache = PrefixStateCache(1 << 40)
    decoder = Decoder(model, state_cache=cache)
    ask(decoder, x)
    one_state = model.state_size(0) + 4 * len(x)
    cache.limit_bytes = one_state * 3 // 2  # room for one saved chat, not two
    ask(decoder, y)  # X is saved
    assert len(cache) == 1
    # Back to X: saving Y first evicts X, the very state about to be restored.
    again_x = ask(decoder, x)
    assert again_x.text == want_x
    assert again_x.timings.cache_n >= len(x) - 1
    # And the context really holds X: Y (re-read, or restored) answers as Y.
    again_y = ask(decoder, y)
    assert again_y.text == want_y


def test_no_state_is_copied_when_the_cache_cannot_keep_it(
    model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = Decoder(model, state_cache=PrefixStateCache(0))  # --cache-ram 0

    def no_copy() -> bytearray:
        raise AssertionError("the KV state was copied although nothing could keep it")

    monkeypatch.setattr(model, "save_state", no_copy)
    ask(decoder, chat(model, "PINEAPPLE"))
    ask(decoder, chat(model, "TOMATO"))  # a switch: the old context would be stashed


def test_a_sequence_id_beyond_n_seq_max_is_refused_before_llama_cpp_sees_it(
    model: LlamaModel,
) -> None:
    assert model.n_seq_max == 4  # the load's n_parallel: one sequence per slot
    with pytest.raises(DecodeError, match="sequence id 4"):
        model.decode(4, [model.bos], 0)
    with pytest.raises(DecodeError, match="sequence id -1"):
        model.save_state(-1)
    with pytest.raises(DecodeError, match="sequence id 4"):
        model.seq_cp(0, 4)
