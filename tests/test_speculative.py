"""Speculative decoding: lossless verification on the real model, drafter and controller."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.backend.llama import LlamaModel, SamplingParams
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.gguf.chat_template import ChatTemplate
from engine.speculative.controller import SpeculationController
from engine.speculative.drafters import NgramDrafter
from engine.wire.control import LoadRequest
from tests.stats import chi_square

CODE = """def compute_total(items):
    total = 0
    for item in items:
        if item.price > 0:
            total += item.price * item.quantity
    return total


def print_total(items):
    print("Total:", compute_total(items))
"""

REWRITE_PROMPTS = [
    f"Rename the function compute_total to sum_prices everywhere in this code and show the full code:\n\n{CODE}",
    "Fix the typo in this paragraph and repeat it exactly otherwise:\n\nThe quick brown fox jumps over the "
    "lazy dgo. The dog was not amused, and the fox ran away into the forest, laughing at the dog.",
    'Reformat this JSON with two-space indentation:\n{"name": "Ada", "age": 36, "languages": ["en", "fr"], '
    '"address": {"city": "London", "zip": "NW1"}}',
]
FREE_PROMPTS = ["Write a short poem about the sea.", "Why is the sky blue? Explain briefly."]


@pytest.fixture(scope="module")
def model(default_model: Path) -> Iterator[LlamaModel]:
    m = LlamaModel(LoadRequest(model=str(default_model), n_ctx=2048, flash_attn="on", threads=2))
    yield m
    m.close()


@pytest.fixture
def decoder(model: LlamaModel) -> Decoder:
    return Decoder(model, state_cache=PrefixStateCache(64 << 20))


def tokens_for(model: LlamaModel, text: str) -> list[int]:
    template = ChatTemplate(model.meta("tokenizer.chat_template"))
    return model.tokenize(
        template.render([{"role": "user", "content": text}]), add_special=False, parse_special=True
    )


def run(
    decoder: Decoder,
    prompt: list[int],
    spec: SpecParams,
    sampling: SamplingParams,
    max_tokens: int = 96,
    *,
    fresh: bool = True,
) -> tuple[GenerationResult, list[str]]:
    if fresh:
        decoder.drop_context()  # byte-level comparisons start from the same (empty) cache state
    pieces: list[str] = []
    result = decoder.generate(
        GenerationRequest(prompt, sampling, max_tokens, speculative=spec), pieces.append
    )
    return result, pieces


GREEDY = SamplingParams(temperature=0.0)
GREEDY_PENALTY = SamplingParams(temperature=0.0, repeat_penalty=1.15, repeat_last_n=64)
FORCED = SpecParams(type="ngram", n_max=6, n_min=6)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [GREEDY, GREEDY_PENALTY], ids=["greedy", "repeat_penalty"])
@pytest.mark.parametrize("prompt_text", REWRITE_PROMPTS + FREE_PROMPTS)
def test_speculation_is_byte_identical_at_temperature_zero(
    decoder: Decoder, model: LlamaModel, prompt_text: str, sampling: SamplingParams
) -> None:
    prompt = tokens_for(model, prompt_text)
    plain, _ = run(decoder, prompt, SpecParams(type="none"), sampling)
    forced, _ = run(decoder, prompt, FORCED, sampling)
    auto, _ = run(decoder, prompt, SpecParams(type="auto"), sampling)
    assert plain.timings.draft_n == 0
    assert forced.text == plain.text
    assert auto.text == plain.text
    assert forced.completion_tokens == plain.completion_tokens
    assert forced.finish_reason == plain.finish_reason


@pytest.mark.slow
def test_rewrite_prompts_are_actually_drafted_and_accepted(
    decoder: Decoder, model: LlamaModel
) -> None:
    prompt = tokens_for(model, REWRITE_PROMPTS[0])
    result, _ = run(decoder, prompt, FORCED, GREEDY, max_tokens=120)
    assert result.timings.draft_n > 20
    assert result.timings.draft_n_accepted >= 20


@pytest.mark.slow
def test_seeded_sampling_is_identical_with_and_without_drafts(
    decoder: Decoder, model: LlamaModel
) -> None:
    prompt = tokens_for(model, REWRITE_PROMPTS[1])
    for seed in (1, 2, 3):
        sampling = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=seed)
        plain, _ = run(decoder, prompt, SpecParams(type="none"), sampling, max_tokens=48)
        spec, _ = run(decoder, prompt, FORCED, sampling, max_tokens=48)
        assert spec.text == plain.text


@pytest.mark.slow
def test_output_distribution_is_the_targets_chi_square(decoder: Decoder, model: LlamaModel) -> None:
    """Over many seeds, the first tokens' distribution with drafts matches plain sampling."""
    # Plain text that repeats, so n-gram drafts exist from the first generated token on.
    prompt = model.tokenize(
        "red green blue red green blue red green blue red green blue red green",
        add_special=True,
        parse_special=False,
    )

    def sampling_for(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=seed)

    n = 100
    # The prompt stays cached between samples (fresh=False): only the distribution matters here.
    plain = Counter(
        run(decoder, prompt, SpecParams(type="none"), sampling_for(s), 4, fresh=False)[0].text
        for s in range(n)
    )
    spec_results = [
        run(decoder, prompt, FORCED, sampling_for(10_000 + s), 4, fresh=False)[0] for s in range(n)
    ]
    assert sum(r.timings.draft_n for r in spec_results) > 0
    spec = Counter(r.text for r in spec_results)
    # Two-sample chi-square over outcomes seen at least 5 times overall (rest pooled).
    chi2, critical, cells = chi_square(plain, spec, n)
    assert chi2 < critical, (chi2, critical, cells)


# --- drafter and controller (no model needed) ---------------------------------------------


def test_ngram_drafter_continues_the_longest_recent_match() -> None:
    d = NgramDrafter(n_min=2, n_max=4)
    d.reset([1, 2, 3, 4, 5, 9, 9, 1, 2, 3])
    draft, n = d.draft(3)
    assert draft == [4, 5, 9]
    assert n == 3
    d.extend([7])  # [.., 1, 2, 3, 7]: now "3 7" has never been seen
    assert d.draft(3) == ([], 0)


def test_ngram_drafter_prefers_the_most_recent_occurrence() -> None:
    d = NgramDrafter(n_min=2, n_max=3)
    d.reset([5, 6, 1, 5, 6, 2, 5, 6])
    assert d.draft(1)[0] == [2]


def test_ngram_index_work_per_token_does_not_grow_with_context() -> None:
    d = NgramDrafter(n_min=2, n_max=6)
    d.reset(list(range(10_000)))
    sizes = [len(ix) for ix in d._index]
    d.extend([1, 2])
    grown = sum(len(ix) for ix in d._index) - sum(sizes)
    assert grown <= 2 * (d.n_max - d.n_min + 1)


def test_controller_turns_speculation_off_when_drafts_fail_and_probes_rarely() -> None:
    ctl = SpeculationController(n_max=8)
    for _ in range(10):
        ctl.record(strength=3, drafted=4, accepted=0)
    decisions = [ctl.choose(strength=3, available=8) for _ in range(400)]
    probes = [k for k in decisions if k]
    assert 0 < len(probes) <= 400 / 16
    for k in probes:
        ctl.record(strength=3, drafted=k, accepted=0)
    later = [ctl.choose(strength=3, available=8) for _ in range(400)]
    assert sum(1 for k in later if k) < len(probes)


def test_controller_drafts_long_when_acceptance_is_high_on_a_cpu() -> None:
    ctl = SpeculationController(n_max=8)
    for _ in range(20):
        ctl.record(strength=6, drafted=8, accepted=8)
    assert ctl.choose(strength=6, available=8) == 8


def test_controller_uses_measured_costs_gpu_like_flat_verify_drafts_more() -> None:
    cpu = SpeculationController(n_max=8)
    gpu = SpeculationController(n_max=8)
    for n in range(1, 10):
        cpu.record_cost(n, 10.0 * (1 + 0.9 * (n - 1)))
        gpu.record_cost(n, 10.0 * (1 + 0.05 * (n - 1)))
    for ctl in (cpu, gpu):
        for i in range(40):  # half the drafts fail at once, the others copy 4 tokens
            ctl.record(strength=2, drafted=4, accepted=0 if i % 2 else 4)
    k_cpu = cpu.choose(strength=2, available=8)
    k_gpu = gpu.choose(strength=2, available=8)
    # Verifying k tokens costs ~k times one on the CPU: a coin flip does not pay.
    # Where verification is nearly free it does, and the full copied span is drafted.
    assert k_cpu == 0
    assert k_gpu >= 4


def test_controller_learns_that_drafts_are_all_or_nothing() -> None:
    ctl = SpeculationController(n_max=8)
    for i in range(60):  # 80% of drafts copy 8 tokens, 20% fail on the first
        ctl.record(strength=4, drafted=8, accepted=8 if i % 5 else 0)
    table = ctl.position_acceptance(4)
    assert 0.6 < table[0] < 0.95
    assert min(table[1:8]) > 0.95
    assert ctl.choose(strength=4, available=8) == 8


@pytest.mark.slow
def test_draft_model_drafting_is_lossless_and_accepted(
    model: LlamaModel, default_model: Path
) -> None:
    """The same model as its own draft: every draft should be accepted, output unchanged."""
    from engine.speculative.drafters import DraftModelDrafter

    draft_model = LlamaModel(
        LoadRequest(model=str(default_model), n_ctx=2048, flash_attn="on", threads=2)
    )
    assert draft_model.vocab_fingerprint() == model.vocab_fingerprint()
    drafter = DraftModelDrafter(draft_model)
    try:
        decoder = Decoder(
            model, state_cache=PrefixStateCache(0), drafters=[NgramDrafter(), drafter]
        )
        prompt = tokens_for(model, FREE_PROMPTS[1])
        plain, _ = run(decoder, prompt, SpecParams(type="none"), GREEDY_PENALTY, max_tokens=64)
        drafted, _ = run(
            decoder,
            prompt,
            SpecParams(type="draft", n_max=4, n_min=4),
            GREEDY_PENALTY,
            max_tokens=64,
        )
        assert drafted.text == plain.text
        assert drafted.timings.draft_n >= 32
        # Greedy drafts of the same model are the target's own greedy choices,
        # except where the repeat penalty (which the draft does not apply) bites.
        assert drafted.timings.draft_n_accepted >= 0.6 * drafted.timings.draft_n
        assert decoder.last_drafter == "draft"
    finally:
        drafter.close()
        draft_model.close()
