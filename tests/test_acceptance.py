"""The acceptance rule of speculative sampling on synthetic distributions (no model).

The exact test composes the rule's two halves analytically: for every draft
distribution q, drafting from q, keeping with min(1, p/q) and resampling the
residual must give back the target's p, to rounding. The sampled tests run
the whole verify loop with a seeded generator.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from engine.speculative.acceptance import (
    TokenDist,
    Verdict,
    acceptance_probability,
    residual,
    sample_and_compare,
    speculative_sampling,
    verify,
)

VOCAB = 12


def dist(weights: dict[int, float]) -> TokenDist:
    tokens = np.array(list(weights), dtype=np.int64)
    return TokenDist.of(tokens, np.array(list(weights.values())))


def output_distribution(p: TokenDist, q: TokenDist) -> dict[int, float]:
    """What one verify position emits, exactly: P(out = x) over the vocabulary."""
    r = residual(p, q)
    reject = sum(
        float(qy) * (1.0 - acceptance_probability(p, q, int(y)))
        for y, qy in zip(q.tokens, q.probs, strict=True)
    )
    return {
        x: q.prob(x) * acceptance_probability(p, q, x) + reject * r.prob(x) for x in range(VOCAB)
    }


def synthetic_pairs() -> list[tuple[str, TokenDist, TokenDist]]:
    rng = np.random.default_rng(7)
    pairs = [
        ("same", dist({1: 0.5, 2: 0.3, 3: 0.2}), dist({1: 0.5, 2: 0.3, 3: 0.2})),
        ("disjoint", dist({1: 0.6, 2: 0.4}), dist({5: 0.7, 6: 0.3})),
        ("greedy draft", dist({1: 0.2, 2: 0.5, 3: 0.3}), TokenDist.one(2)),
        ("greedy draft, wrong", dist({1: 0.2, 2: 0.5, 3: 0.3}), TokenDist.one(9)),
        ("greedy target", TokenDist.one(4), dist({4: 0.3, 5: 0.7})),
        ("wider draft", dist({1: 0.9, 2: 0.1}), dist({1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25})),
        ("narrower draft", dist({1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}), dist({1: 0.9, 2: 0.1})),
    ]
    for i in range(40):
        support_p = rng.choice(VOCAB, size=int(rng.integers(1, VOCAB)), replace=False)
        support_q = rng.choice(VOCAB, size=int(rng.integers(1, VOCAB)), replace=False)
        p = TokenDist.of(support_p, rng.dirichlet(np.full(support_p.size, 0.5)))
        q = TokenDist.of(support_q, rng.dirichlet(np.full(support_q.size, 0.5)))
        pairs.append((f"random {i}", p, q))
    return pairs


@pytest.mark.parametrize(
    ("name", "p", "q"), synthetic_pairs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_drafting_from_q_then_the_rule_gives_exactly_p(
    name: str, p: TokenDist, q: TokenDist
) -> None:
    out = output_distribution(p, q)
    for x in range(VOCAB):
        assert out[x] == pytest.approx(p.prob(x), abs=1e-12), (name, x)


def test_acceptance_is_one_minus_total_variation_and_beats_compare() -> None:
    p = dist({1: 0.5, 2: 0.3, 3: 0.2})
    q = dist({1: 0.45, 2: 0.35, 3: 0.2})
    rule = sum(q.prob(x) * acceptance_probability(p, q, x) for x in range(VOCAB))
    assert rule == pytest.approx(1.0 - 0.5 * sum(abs(p.prob(x) - q.prob(x)) for x in range(VOCAB)))
    # The old rule: the draft's greedy token, kept when the target's sample equals it.
    compare = p.prob(int(q.tokens[np.argmax(q.probs)]))
    assert rule == pytest.approx(0.95) and compare == pytest.approx(0.5)
    # A greedy draft under the rule is the old rule exactly.
    one = TokenDist.one(1)
    assert acceptance_probability(p, one, 1) == pytest.approx(compare)


def test_token_dist_basics() -> None:
    d = TokenDist.of(np.array([7, 3, 5]), np.array([1.0, 0.0, 3.0]))
    assert d.tokens.tolist() == [5, 7] and d.probs.tolist() == [0.75, 0.25]
    assert d.prob(3) == 0.0 and d.prob(99) == 0.0 and d.prob(5) == 0.75
    assert d.probs_of(np.array([7, 100, 5, 0])).tolist() == [0.25, 0.0, 0.75, 0.0]
    assert [d.draw(u) for u in (0.0, 0.74, 0.76, 0.999999)] == [5, 5, 7, 7]
    with pytest.raises(ValueError):
        TokenDist.of(np.array([1]), np.array([0.0]))


# --- the verify loop over a scripted target -----------------------------------------------


class ScriptedRows:
    """A target whose p at each row depends on the tokens emitted before it."""

    def __init__(self, p_first: TokenDist, p_after: dict[int, TokenDist], draft: list[int]) -> None:
        self.p_first = p_first
        self.p_after = p_after
        self.draft = draft
        self.accepted: list[int] = []
        self.rng = np.random.default_rng(0)

    def distribution(self, row: int) -> TokenDist:
        # Row i's logits were computed after the draft tokens d1..di: only valid
        # when everything before it was accepted, which the loop guarantees.
        assert self.accepted == self.draft[:row], "a row read after a rejection"
        return self.p_first if row == 0 else self.p_after[self.draft[0]]

    def sample(self, row: int) -> int:
        token = self.distribution(row).draw(self.rng.random())
        self.accept(token, row)
        return token

    def accept(self, token: int, row: int) -> None:
        assert row == len(self.accepted)
        self.accepted.append(token)


P1 = dist({1: 0.5, 2: 0.3, 3: 0.2})
P2 = {1: dist({4: 0.6, 5: 0.4}), 2: dist({4: 0.1, 6: 0.9}), 3: dist({5: 1.0})}
Q1 = dist({1: 0.3, 2: 0.5, 3: 0.2})
Q2 = {1: dist({4: 0.9, 5: 0.1}), 2: dist({6: 0.5, 7: 0.5}), 3: dist({5: 1.0})}


def two_token_runs(n: int, seed: int, *, rule: bool) -> tuple[Counter[tuple[int, int]], int]:
    """Emits the first two tokens n times by drafting 2 from Q and verifying; returns
    the joint counts and the number of draft tokens accepted."""
    rng = np.random.default_rng(seed)
    counts: Counter[tuple[int, int]] = Counter()
    kept = 0
    for _ in range(n):
        d1 = Q1.draw(rng.random())
        d2 = Q2[d1].draw(rng.random())
        rows = ScriptedRows(P1, P2, [d1, d2])
        rows.rng = rng
        draft = [d1, d2]
        if rule:
            verdict = speculative_sampling(rows, draft, [Q1, Q2[d1]], rng)
        else:
            verdict = sample_and_compare(rows, draft)
        kept += verdict.accepted
        emitted = [*draft[: verdict.accepted], verdict.next_token]
        # Stateful samplers saw exactly the emitted tokens, in order.
        assert rows.accepted == emitted
        if len(emitted) < 2:  # rejected at once: the second token is a plain sample
            emitted.append(P2[emitted[0]].draw(rng.random()))
        counts[(emitted[0], emitted[1])] += 1
    return counts, kept


def chi_square(counts: Counter[tuple[int, int]], n: int) -> tuple[float, int]:
    cells = [(a, b) for a, pa in zip(P1.tokens, P1.probs, strict=True) for b in P2[int(a)].tokens]
    expected = {(int(a), int(b)): P1.prob(int(a)) * P2[int(a)].prob(int(b)) * n for a, b in cells}
    assert set(counts) <= set(expected), "an output the target could never emit"
    return sum((counts[c] - e) ** 2 / e for c, e in expected.items()), len(expected) - 1


def test_the_verify_loop_emits_the_targets_joint_distribution() -> None:
    n = 20_000
    counts, kept = two_token_runs(n, seed=1, rule=True)
    stat, dof = chi_square(counts, n)
    # Critical value of chi-square with 4 degrees of freedom at p = 0.001.
    assert dof == 4 and stat < 18.47, (stat, counts)
    compare_counts, compare_kept = two_token_runs(n, seed=2, rule=False)
    assert chi_square(compare_counts, n)[0] < 18.47
    # Sampled drafts kept by the rule beat the same drafts compared with a sample.
    assert kept > 1.3 * compare_kept


def test_a_fully_accepted_draft_ends_with_a_sample_of_the_last_row() -> None:
    rows = ScriptedRows(TokenDist.one(1), {1: TokenDist.one(5)}, [1])
    verdict = speculative_sampling(rows, [1], [TokenDist.one(1)], np.random.default_rng(3))
    assert verdict == Verdict(1, 5)
    assert rows.accepted == [1, 5]


def test_greedy_target_and_any_draft_distribution_is_deterministic() -> None:
    # Temperature 0: p is certain, so the rule keeps the draft only where it is
    # the target's choice and otherwise emits that choice, whatever the RNG says.
    for seed, q in itertools.product(range(20), (TokenDist.one(2), dist({2: 0.5, 3: 0.5}))):
        rows = ScriptedRows(TokenDist.one(3), {2: TokenDist.one(4), 3: TokenDist.one(4)}, [2, 4])
        verdict = verify(rows, [2, 4], [q, TokenDist.one(4)], np.random.default_rng(seed))
        assert verdict == Verdict(0, 3)


def test_missing_distributions_are_refused() -> None:
    rows = ScriptedRows(P1, P2, [1, 4])
    with pytest.raises(ValueError, match="every draft token"):
        speculative_sampling(rows, [1, 4], [Q1], np.random.default_rng(0))


def test_any_request_seed_seeds_the_rule() -> None:
    # OpenAI clients send any integer as a seed, negative ones and 2**64 + 3 included.
    from engine.backend.llama import SamplingParams
    from engine.decoding.request import GenerationRequest
    from engine.decoding.sampling import sampler_for
    from tests.fake_model import FakeModel, answer_after

    model = FakeModel(answer_after([1], [2]))
    for seed in (2**64 + 3, -(2**63), -1, 0, None):
        req = GenerationRequest([1], SamplingParams(temperature=0.0, seed=seed), 4)
        sampler = sampler_for(model, req)  # type: ignore[arg-type]
        assert 0.0 <= sampler.rng.random() < 1.0
        sampler.close()
