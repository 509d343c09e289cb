"""MTP heads on a tiny random-weight glm4moe GGUF: loading, feeding, drafting, rollback.

Acceptance rates mean nothing with random weights; these tests check the
mechanics and that speculation with MTP drafts never changes the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np
import openai
import pytest

from engine.backend.llama import LlamaLogCapture, LlamaModel, SamplingParams
from engine.backend.mtp import MtpPlan, attach_mtp, mtp_refusal, plan_mtp
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.gguf.header import read_gguf_header
from engine.planning.estimate import estimate, shape_from_header
from engine.planning.planner import plan_for_file
from engine.speculative.drafters import build_chain
from engine.wire.control import LoadRequest
from tests.engine_proc import EngineProc, running_engine
from tests.mtp_fixture import tiny_mtp_model

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="session")
def mtp_gguf(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Path:
    return tiny_mtp_model(tmp_path_factory.mktemp("mtp") / "tiny-mtp.gguf", default_model)


def load(path: Path, **changes: object) -> LlamaModel:
    fields: dict[str, object] = {"model": str(path), "n_ctx": 512, "n_batch": 64, "threads": 2}
    return LlamaModel(LoadRequest.model_validate({**fields, **changes}))


@pytest.fixture(scope="module")
def model(mtp_gguf: Path) -> Iterator[LlamaModel]:
    m = load(mtp_gguf)
    yield m
    m.close()


def prompt_tokens(model: LlamaModel) -> list[int]:
    return model.tokenize(PROMPT, add_special=True, parse_special=False)


def greedy_continuation(model: LlamaModel, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, decoded one at a time (the reference path)."""
    model.clear()
    model.decode(0, prompt, 0)
    sampler = model.greedy_sampler()
    out = [sampler.sample(-1)]
    for i in range(n - 1):
        model.decode(0, out[-1:], len(prompt) + i)
        out.append(sampler.sample(-1))
    sampler.close()
    return out


def test_the_model_loads_with_its_mtp_heads(model: LlamaModel) -> None:
    assert model.mtp is not None
    assert model.mtp_heads == 1
    assert model.mtp_reason is None
    assert llama_cpp.llama_model_n_layer_nextn(model.model) == 1


def test_mtp_refused_at_load_skips_the_heads_and_says_why(mtp_gguf: Path) -> None:
    m = load(mtp_gguf, mtp=False)
    try:
        # The trap both checks guard against: the count still reads 1 from
        # metadata although the NextN tensors were skipped.
        assert llama_cpp.llama_model_n_layer_nextn(m.model) == 1
        assert m.mtp is None
        assert m.mtp_heads == 1
        assert m.mtp_reason == "MTP heads turned off at load"
    finally:
        m.close()


def test_missing_bindings_leave_the_model_without_mtp(model: LlamaModel) -> None:
    reason = "this llama-cpp-python lacks llama_get_embeddings_nextn"
    ctx, why = attach_mtp(model, MtpPlan(1, True, None), bindings=reason)
    assert ctx is None
    assert why == reason


def test_architectures_that_cant_roll_back_are_refused_before_loading(
    mtp_gguf: Path, default_model: Path
) -> None:
    refusal = mtp_refusal("deepseek2", 1, wanted=True)
    assert refusal is not None and "roll back" in refusal
    assert mtp_refusal("glm4moe", 1, wanted=True) is None
    assert plan_mtp(str(mtp_gguf), wanted=True) == MtpPlan(1, True, None)
    assert plan_mtp(str(default_model), wanted=True) == MtpPlan(0, False, None)


def test_drafts_depend_on_the_hidden_state(model: LlamaModel) -> None:
    """A batch without the hidden state would be accepted silently: the drafts must change."""
    assert model.mtp is not None
    prompt = prompt_tokens(model)
    first = greedy_continuation(model, prompt, 1)[0]
    drafts, probs = model.mtp.draft(0, first, len(prompt), 4)
    assert len(drafts) == 4 and len(probs) == 4
    assert all(0.0 < p <= 1.0 for p in probs)
    # Drafting leaves no trace: the same call drafts the same again.
    assert model.mtp.draft(0, first, len(prompt), 4)[0] == drafts
    # The same tokens and position with the target's hidden state zeroed.
    rows = model.mtp._seqs[0].rows
    saved = rows.copy()
    rows[:] = 0.0
    try:
        blind, blind_probs = model.mtp.draft(0, first, len(prompt), 4)
    finally:
        rows[:] = saved
    assert (blind, blind_probs) != (drafts, probs)
    assert not np.allclose(blind_probs, probs)


def test_rollback_keeps_the_mtp_context_in_step(model: LlamaModel) -> None:
    """After a verify batch with rejected drafts and a rollback, the heads draft exactly
    what they draft after plain one-token decoding of the same tokens."""
    assert model.mtp is not None
    prompt = prompt_tokens(model)
    ref = greedy_continuation(model, prompt, 6)
    expected = model.mtp.draft(0, ref[5], len(prompt) + 5, 3)[0]

    model.clear()
    model.decode(0, prompt, 0)
    # ref[0] pending, ref[1..3] accepted, two wrong drafts rejected.
    wrong = [(ref[4] + 1) % model.n_vocab, (ref[5] + 7) % model.n_vocab]
    model.decode(0, [*ref[:4], *wrong], len(prompt), logits_all=True)
    assert model.truncate(0, len(prompt) + 4)
    model.decode(0, ref[4:5], len(prompt) + 4)
    assert model.mtp.draft(0, ref[5], len(prompt) + 5, 3)[0] == expected


def generate(decoder: Decoder, prompt: list[int], spec: SpecParams) -> GenerationResult:
    decoder.drop_context()
    return decoder.generate(GenerationRequest(prompt, GREEDY, 40, speculative=spec), _ignore)


def _ignore(_text: str) -> None:
    pass


def test_greedy_output_with_mtp_drafts_is_byte_identical(model: LlamaModel, mtp_gguf: Path) -> None:
    decoder = Decoder(model, state_cache=PrefixStateCache(0), drafters=build_chain(None, model.mtp))
    assert [d.name for d in decoder.drafters] == ["mtp", "ngram"]
    prompt = prompt_tokens(model)
    plain = generate(decoder, prompt, SpecParams(type="none"))
    # n_min forces drafts every step, whatever the (random) acceptance.
    forced = generate(decoder, prompt, SpecParams(type="mtp", n_max=4, n_min=4))
    assert decoder.last_drafter == "mtp"
    auto = generate(decoder, prompt, SpecParams(type="auto"))
    assert forced.timings.draft_n >= 20
    # Random heads are never accepted: measured not to pay, they sit the next request out.
    assert decoder.last_drafter == "ngram"
    assert forced.text == plain.text
    assert auto.text == plain.text
    assert forced.completion_tokens == plain.completion_tokens == 40

    # And the same as the file served without its heads.
    bare = load(mtp_gguf, mtp=False)
    try:
        alone = Decoder(bare, state_cache=PrefixStateCache(0))
        assert generate(alone, prompt, SpecParams(type="none")).text == plain.text
    finally:
        bare.close()


def ask(proc: EngineProc, spec: dict[str, object], max_tokens: int = 24) -> str:
    """A greedy chat answer through the official client, with these speculative settings."""
    client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key=proc.key)
    answer = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body={"speculative": spec},
    )
    return answer.choices[0].message.content or ""


def speculative_status(proc: EngineProc) -> dict[str, object]:
    with proc.client() as http:
        status: dict[str, object] = http.get("/v1/engine/status").json()["speculative"]
    return status


@pytest.mark.slow
def test_the_engine_serves_mtp_and_says_so(mtp_gguf: Path) -> None:
    with running_engine("--model", str(mtp_gguf), "--ctx", "512", "--threads", "2") as proc:
        plain = ask(proc, {"type": "none"})
        assert ask(proc, {"type": "mtp", "n_min": 3, "n_max": 3}) == plain
        status = speculative_status(proc)
        assert status["drafter"] == "mtp"
        assert status["mtp_heads"] == 1
        assert status["mtp_unavailable"] is None
        assert ask(proc, {"type": "auto"}) == plain
        # Random heads are never accepted: once measured, auto leaves them out of a
        # request (or tries them again on a later one; the tool self-test counts).
        assert speculative_status(proc)["drafter"] in ("ngram", "mtp+ngram")


@pytest.mark.slow
def test_the_same_file_with_mtp_refused_still_serves_plainly(mtp_gguf: Path) -> None:
    args = ("--model", str(mtp_gguf), "--ctx", "512", "--threads", "2", "--no-mtp")
    with running_engine(*args) as proc:
        assert ask(proc, {"type": "auto"}, max_tokens=8)
        with pytest.raises(openai.BadRequestError, match="MTP heads turned off at load"):
            ask(proc, {"type": "mtp"}, max_tokens=8)
        status = speculative_status(proc)
        assert status["drafter"] == "ngram"
        assert status["mtp_heads"] == 1
        assert status["mtp_unavailable"] == "MTP heads turned off at load"


def test_the_planner_counts_the_mtp_context(mtp_gguf: Path) -> None:
    """KV and compute as llama.cpp reports them with the MTP context, and without it."""
    header = read_gguf_header(mtp_gguf)
    shape = shape_from_header(header)
    assert shape.mtp and shape.nextn_layers == 1
    capture = LlamaLogCapture()
    for mtp in (True, False):
        m = LlamaModel(
            LoadRequest(model=str(mtp_gguf), n_ctx=1024, threads=2, flash_attn="on", mtp=mtp),
            log_capture=capture,
        )
        actual = m.memory_report
        m.close()
        planned = estimate(replace(shape, mtp=mtp), n_ctx=1024, flash_attn=True)
        # llama.cpp logs each buffer in MiB with two decimals.
        assert abs(planned.kv - actual.kv) <= 2 * 2**20 // 100
        assert abs(planned.compute - actual.compute) <= 0.05 * actual.compute
    plan = plan_for_file(mtp_gguf, measure=False)
    assert any(r.startswith("1 MTP head: loaded") for r in plan.reasons)


def test_a_restored_state_restarts_the_mtp_sequence(model: LlamaModel) -> None:
    """The MTP context can't follow a restored KV state: it starts afresh and drafts on."""
    assert model.mtp is not None
    prompt = prompt_tokens(model)
    ref = greedy_continuation(model, prompt, 3)  # the cache: prompt + ref[:2]
    saved = model.save_state(0)
    model.clear()
    assert model.restore_state(0, saved)
    n = len(prompt) + 2
    assert model.mtp.draft(0, ref[2], n, 3) == ([], [])  # no hidden state known yet
    model.decode(0, ref[2:], n)
    sampler = model.greedy_sampler()
    pending = sampler.sample(-1)
    sampler.close()
    drafts, _ = model.mtp.draft(0, pending, n + 1, 3)
    assert len(drafts) == 3
