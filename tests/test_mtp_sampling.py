"""MTP drafts under sampling: drawn like the request, verified by speculative sampling.

The model is the tiny glm4moe MTP fixture with nearly flat logits
(tests/mtp_fixture.py, `output_scale`), and the requests bias four colour
words: the target's distribution and the MTP head's are then both shaped by
the bias, close but not equal, so drafts are often, not always, accepted
(with the fixture's default weights the head and the trunk never agree).
Greedy output with MTP drafts is checked in tests/test_mtp.py.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from engine.backend.llama import LlamaModel, SamplingParams
from engine.decoding import slot as slot_module
from engine.decoding.decoder import Decoder
from engine.decoding.prefix_cache import PrefixStateCache
from engine.decoding.request import GenerationRequest, GenerationResult, SpecParams
from engine.speculative.acceptance import TokenDist, Verdict
from engine.speculative.drafters import Draft, build_chain
from engine.speculative.mtp import MtpDrafter
from engine.wire.control import LoadRequest
from tests.mtp_fixture import tiny_mtp_model
from tests.stats import chi_square

PROMPT = "The quick brown fox jumps over the lazy dog, and then"
COLOURS = (" red", " green", " blue", " yellow")
PLAIN = SpecParams(type="none")
MTP_2 = SpecParams(type="mtp", n_max=2, n_min=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[LlamaModel]:
    path = tmp_path_factory.mktemp("mtp-flat") / "flat-mtp.gguf"
    tiny_mtp_model(path, default_model, output_scale=0.05)
    fields = {"model": str(path), "n_ctx": 512, "n_batch": 64, "threads": 1}
    m = LlamaModel(LoadRequest.model_validate(fields))
    yield m
    m.close()


@pytest.fixture
def decoder(model: LlamaModel) -> Iterator[Decoder]:
    d = Decoder(model, state_cache=PrefixStateCache(0), drafters=build_chain(None, model.mtp))
    assert isinstance(d.drafters[0], MtpDrafter)
    yield d
    d.close()


def colour_ids(model: LlamaModel) -> list[int]:
    ids = [model.tokenize(w, add_special=False, parse_special=False) for w in COLOURS]
    assert all(len(t) == 1 for t in ids)
    return [t[0] for t in ids]


def sampling(model: LlamaModel, seed: int, *, bias: bool = True) -> SamplingParams:
    """Temperature 0.8; the colours biased far above every other token (1 apart)."""
    logit_bias = tuple((t, 20.0 - i) for i, t in enumerate(colour_ids(model))) if bias else ()
    return SamplingParams(
        temperature=0.8, top_k=40, top_p=1.0, min_p=0.0, seed=seed, logit_bias=logit_bias
    )


def prompt_tokens(model: LlamaModel) -> list[int]:
    return model.tokenize(PROMPT, add_special=True, parse_special=False)


def run(
    decoder: Decoder, model: LlamaModel, spec: SpecParams, params: SamplingParams, n: int
) -> GenerationResult:
    request = GenerationRequest(prompt_tokens(model), params, n, speculative=spec)
    return decoder.generate(request, lambda _: None)


def test_sampled_mtp_drafts_carry_the_distributions_they_were_drawn_from(
    model: LlamaModel,
) -> None:
    assert model.mtp is not None
    prompt = prompt_tokens(model)
    params = sampling(model, 7)
    model.clear()
    model.decode(0, prompt, 0)
    chain = model.sampler(params)
    first = chain.sample(-1)
    chain.close()

    drafter = MtpDrafter(model.mtp, 0)
    drafter.sample_like(params)
    drafter.reset([*prompt, first])
    draft = drafter.propose(3)
    assert len(draft.tokens) == 3
    assert draft.dists is not None and draft.probs is not None
    for token, dist, prob in zip(draft.tokens, draft.dists, draft.probs, strict=True):
        assert prob == dist.prob(token) > 0.0
        # Shaped by the request's bias: a real distribution, not a greedy pick.
        assert dist.probs_of(np.array(colour_ids(model))).sum() > 0.999
        assert dist.probs.max() < 0.99

    # The first is the request's chain over the head's logits (drafting leaves no trace).
    seen: list[NDArray[np.float32]] = []

    def look(logits: NDArray[np.float32]) -> int:
        seen.append(logits.copy())
        return int(np.argmax(logits))

    model.mtp.draft(0, first, len(prompt), 1, look)
    reference = model.sampler(params)
    want = TokenDist.of(*reference.distribution(seen[0]))
    reference.close()
    assert np.array_equal(draft.dists[0].tokens, want.tokens)
    assert np.allclose(draft.dists[0].probs, want.probs)

    # Seeded: the same seed draws the same drafts.
    drafter.sample_like(params)
    drafter.reset([*prompt, first])
    assert drafter.propose(3).tokens == draft.tokens

    # A greedy request: the head's argmax (q = 1 on it), verified by sample and compare.
    drafter.sample_like(SamplingParams(temperature=0.0))
    drafter.reset([*prompt, first])
    greedy = drafter.propose(3)
    assert greedy.dists is None and greedy.probs is None
    assert greedy.tokens == model.mtp.draft(0, first, len(prompt), 3)[0]
    drafter.close()


def test_sampled_output_distribution_with_mtp_drafts_is_plain_samplings_chi_square(
    decoder: Decoder, model: LlamaModel
) -> None:
    """The first three tokens over many seeds at temperature 0.8: with MTP drafts (the
    last two verified by speculative sampling) and without."""
    n = 200
    plain = Counter(run(decoder, model, PLAIN, sampling(model, s), 3).text for s in range(n))
    spec_runs = [run(decoder, model, MTP_2, sampling(model, 10_000 + s), 3) for s in range(n)]
    drafted = sum(r.timings.draft_n for r in spec_runs)
    accepted = sum(r.timings.draft_n_accepted for r in spec_runs)
    assert drafted >= n  # every answer had drafts verified
    assert 0.2 * drafted < accepted < drafted  # many accepted, some rejected
    spec = Counter(r.text for r in spec_runs)
    # Two-sample chi-square over outcomes seen at least 5 times overall (rest pooled).
    chi2, critical, cells = chi_square(plain, spec, n)
    assert chi2 < critical, (chi2, critical, cells)


def test_sampled_mtp_drafts_are_verified_by_speculative_sampling(
    decoder: Decoder, model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every MTP verify step gets the drafts' distributions, and the probability rule
    keeps more of the same sampled drafts than comparing them with the target's sample."""
    rules: list[bool] = []
    real_verify = slot_module.verify

    def spy(rows: object, draft: list[int], dists: list[TokenDist] | None, rng: object) -> Verdict:
        rules.append(dists is not None)
        return real_verify(rows, draft, dists, rng)  # type: ignore[arg-type]

    monkeypatch.setattr(slot_module, "verify", spy)

    def acceptance() -> float:
        drafted = accepted = 0
        for seed in range(8):
            result = run(decoder, model, MTP_2, sampling(model, seed), 24)
            drafted += result.timings.draft_n
            accepted += result.timings.draft_n_accepted
        return accepted / drafted

    by_rule = acceptance()
    assert rules and all(rules)

    real_propose = MtpDrafter.propose

    def without_dists(self: MtpDrafter, k: int) -> Draft:
        return dataclasses.replace(real_propose(self, k), dists=None, probs=None)

    rules.clear()
    monkeypatch.setattr(MtpDrafter, "propose", without_dists)
    by_comparison = acceptance()
    assert rules and not any(rules)
    print(f"MTP acceptance at 0.8: speculative sampling {by_rule:.3f}, compare {by_comparison:.3f}")
    assert by_rule > by_comparison + 0.1, (by_rule, by_comparison)


@pytest.mark.parametrize(
    ("bias", "draft_ms", "drafts"),
    [
        (True, 0.5, True),  # drafts mostly accepted, cheap: verify them
        (False, 0.5, False),  # drafts never accepted (no bias): plain decoding
        (True, 40.0, False),  # accepted, but each costs four target tokens: plain
    ],
)
def test_the_controller_weighs_mtp_acceptance_and_cost(
    decoder: Decoder, model: LlamaModel, bias: bool, draft_ms: float, drafts: bool
) -> None:
    """The draft length follows acceptance measured by the probability rule and the
    drafting cost. Costs are pinned (no timing in tests): a target token 10 ms, a verify
    row more 0.5 ms."""
    ctl = decoder.controller
    mtp = decoder.drafters[0]
    for rows in range(1, 18):
        ctl.record_cost(rows, 10.0 + 0.5 * (rows - 1))
    ctl.record_draft_cost(draft_ms, drafter=mtp)
    ctl.record_cost = lambda *_: None  # type: ignore[method-assign]
    pinned = ctl.record_draft_cost
    # Whatever a draft really took, the controller learns the pinned cost (a trial
    # after a costly drafter sat requests out measures it afresh).
    ctl.record_draft_cost = lambda _ms, **kw: pinned(draft_ms, **kw)  # type: ignore[method-assign]
    auto = SpecParams(type="mtp", n_max=4)
    run(decoder, model, auto, sampling(model, 0, bias=bias), 24)  # acceptance is learned
    generated = drafted = 0
    for seed in range(1, 4):
        result = run(decoder, model, auto, sampling(model, seed, bias=bias), 24)
        generated += result.completion_tokens
        drafted += result.timings.draft_n
    # Measured here: 99 drafted for 72 tokens, 4 (no bias) and 6 (costly) when off.
    if drafts:
        assert drafted > 0.5 * generated  # drafts on most steps
        accepted = ctl.acceptance_of(mtp)
        assert accepted is not None and accepted > 0.3
    else:
        assert drafted <= 0.2 * generated  # rare probes only
