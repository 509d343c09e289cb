"""Speculative sampling end to end: the built-in model drafting for a Q4_0 copy of itself.

The copy is made here with llama_model_quantize, so the two models are close
but not equal: drafts are mostly, not always, accepted. At temperature 0.8
the output distribution must be plain sampling's (a seeded chi-square test),
greedy output must not change, and drafts drawn from the draft model's own
distribution and verified by speculative sampling must be accepted more often
than greedy drafts compared with the target's sample (the rule before).
"""

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
from engine.speculative.drafters import DraftModelDrafter
from engine.wire.control import LoadRequest
from tests.stats import chi_square

pytestmark = pytest.mark.slow

Q4_0 = 2  # llama_ftype
PLAIN = SpecParams(type="none")
DRAFT = SpecParams(type="draft", n_max=4, n_min=4)


@pytest.fixture(scope="module")
def q4_0_copy(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import llama_cpp

    from engine.runtimes import ensure_backends

    ensure_backends()

    out = tmp_path_factory.mktemp("quantized") / "smollm2-135m-Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_0
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(default_model).encode(), str(out).encode(), params)
    assert rc == 0, f"quantizing failed ({rc})"
    return out


@pytest.fixture(scope="module")
def models(default_model: Path, q4_0_copy: Path) -> Iterator[tuple[LlamaModel, LlamaModel]]:
    def load(path: Path) -> LlamaModel:
        return LlamaModel(LoadRequest(model=str(path), n_ctx=1024, flash_attn="on", threads=1))

    target, draft = load(q4_0_copy), load(default_model)
    yield target, draft
    target.close()
    draft.close()


@pytest.fixture(scope="module")
def setup(
    models: tuple[LlamaModel, LlamaModel],
) -> Iterator[tuple[Decoder, DraftModelDrafter, LlamaModel]]:
    target, draft = models
    drafter = DraftModelDrafter(draft)
    decoder = Decoder(target, state_cache=PrefixStateCache(0), drafters=[drafter])
    yield decoder, drafter, target
    decoder.close()


def chat(model: LlamaModel, text: str) -> list[int]:
    template = ChatTemplate(model.meta("tokenizer.chat_template"))
    return model.tokenize(
        template.render([{"role": "user", "content": text}]), add_special=False, parse_special=True
    )


def run(
    decoder: Decoder, prompt: list[int], spec: SpecParams, sampling: SamplingParams, n: int
) -> GenerationResult:
    return decoder.generate(
        GenerationRequest(prompt, sampling, n, speculative=spec), lambda _: None
    )


def test_the_vocabularies_match(models: tuple[LlamaModel, LlamaModel]) -> None:
    target, draft = models
    assert target.vocab_fingerprint() == draft.vocab_fingerprint()


def test_greedy_output_is_unchanged_by_draft_model_drafting(
    setup: tuple[Decoder, DraftModelDrafter, LlamaModel],
) -> None:
    decoder, _drafter, target = setup
    greedy = SamplingParams(temperature=0.0)
    for text in ("Why is the sky blue? Explain briefly.", "Write a haiku about rain."):
        prompt = chat(target, text)
        decoder.drop_context()
        plain = run(decoder, prompt, PLAIN, greedy, 48)
        decoder.drop_context()
        drafted = run(decoder, prompt, DRAFT, greedy, 48)
        assert drafted.text == plain.text
        # Q4_0 and Q4_1 of a 135M model agree on about two greedy tokens in three.
        assert drafted.timings.draft_n >= 24
        assert drafted.timings.draft_n_accepted > 0.25 * drafted.timings.draft_n


def test_sampled_output_distribution_is_plain_samplings_chi_square(
    setup: tuple[Decoder, DraftModelDrafter, LlamaModel],
) -> None:
    """The first three tokens over many seeds: with drafts (the last two verified by
    speculative sampling) and without, at temperature 0.8."""
    decoder, _drafter, target = setup
    prompt = chat(target, "Name a colour.")

    def sampling(seed: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, top_k=4, top_p=1.0, min_p=0.0, seed=seed)

    n = 150
    decoder.drop_context()
    plain = Counter(run(decoder, prompt, PLAIN, sampling(s), 3).text for s in range(n))
    spec_runs = [run(decoder, prompt, DRAFT, sampling(10_000 + s), 3) for s in range(n)]
    drafted = sum(r.timings.draft_n for r in spec_runs)
    assert drafted >= n  # every answer had drafts verified
    assert sum(r.timings.draft_n_accepted for r in spec_runs) < drafted  # and some rejected
    spec = Counter(r.text for r in spec_runs)
    # Two-sample chi-square over outcomes seen at least 5 times overall (rest pooled).
    chi2, critical, cells = chi_square(plain, spec, n)
    assert chi2 < critical, (chi2, critical, cells)


def test_speculative_sampling_accepts_more_than_sample_and_compare(
    setup: tuple[Decoder, DraftModelDrafter, LlamaModel],
) -> None:
    decoder, drafter, target = setup
    prompts = [chat(target, t) for t in ("Write a short poem about the sea.", "Tell me a story.")]

    def acceptance(sample: bool) -> float:
        drafter.sample = sample  # False: greedy drafts, kept while the target's sample equals them
        drafted = accepted = 0
        for seed, prompt in enumerate(prompts * 2):
            decoder.drop_context()
            sampling = SamplingParams(temperature=0.8, seed=seed)
            result = run(decoder, prompt, DRAFT, sampling, 32)
            drafted += result.timings.draft_n
            accepted += result.timings.draft_n_accepted
        return accepted / drafted

    try:
        old = acceptance(sample=False)
        new = acceptance(sample=True)
    finally:
        drafter.sample = True
    print(
        f"acceptance at temperature 0.8: sample-and-compare {old:.3f}, speculative sampling {new:.3f}"
    )
    assert new > old + 0.05, (old, new)
