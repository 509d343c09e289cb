"""The speculation controller: how many draft tokens to verify per step, from
acceptance and verify cost measured on this machine, so that speculation never loses.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Prior cost of decoding a batch of n tokens relative to one token, measured on
# a 2-core CPU (measured: 10.2, 18.8, 30.0, 46.2, 87.3 ms for 1/2/4/8/16).
# Replaced by this machine's own measurements as soon as they exist.
CPU_PRIOR_COST = {1: 1.0, 2: 1.84, 4: 2.94, 8: 4.53, 16: 8.56}

# Strengths above this share one bucket of statistics.
MAX_STRENGTH_BUCKET = 6

# Longest draft the controller keeps statistics for (requests cap n_max at 16).
MAX_DRAFT = 16


def _interpolate(table: dict[int, float], n: int) -> float:
    keys = sorted(table)
    if n <= keys[0]:
        return table[keys[0]] * n / keys[0]
    for lo, hi in itertools.pairwise(keys):
        if lo <= n <= hi:
            frac = (n - lo) / (hi - lo)
            return table[lo] + frac * (table[hi] - table[lo])
    last = keys[-1]
    return table[last] * n / last


class DraftSource(Protocol):
    """What the controller needs to know of a drafter (every `Drafter` is one)."""

    name: str

    def prior(self, strength: int) -> float: ...


class _MatchPrior:
    """The source assumed when none is named: longer matches are likelier."""

    name = ""

    def prior(self, strength: int) -> float:
        return 0.6 + 0.06 * min(strength, MAX_STRENGTH_BUCKET)


ANY_SOURCE: DraftSource = _MatchPrior()


@dataclass
class DraftStats:
    """Acceptance observed per (drafter, strength bucket), and totals over all."""

    # P(draft token i accepted | tokens before it accepted), per (drafter,
    # strength bucket) and per draft position: drafts tend to be all right (a
    # copied span) or wrong at once, so later positions are far likelier to hold.
    acceptance: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    # (drafted, accepted) per drafter name.
    by_drafter: dict[str, tuple[int, int]] = field(default_factory=dict)


class SpeculationController:
    """Chooses the draft length per step from measured acceptance and verify cost.

    The expected tokens per step with draft length k and per-token acceptance a
    is 1 + a + a^2 + ... + a^k; a step costs cost(k+1). The controller picks the
    k that maximises tokens per unit of time, and k = 0 (plain decoding) when no
    k beats it. When it has turned speculation off it probes again later, each
    failed probe doubling the wait, so the probes' cost stays negligible.
    """

    def __init__(
        self,
        *,
        n_max: int = 8,
        n_min: int = 0,
        p_min: float = 0.0,
        prior_cost: dict[int, float] | None = None,
        margin: float = 1.03,
    ) -> None:
        self.n_max = n_max
        self.n_min = n_min
        self.p_min = p_min
        self.margin = margin
        self._prior = dict(prior_cost or CPU_PRIOR_COST)
        self._cost_ms: dict[int, float] = {}
        self.stats = DraftStats()
        self.current_k = 0
        self._cooldown = 0
        self._probe_wait = 16
        self._draft_ms: dict[str, float] = {}
        # Costly drafters judged not to pay: requests skipped, and after how many to retry.
        self._skipped: dict[str, int] = {}
        self._retry_after: dict[str, int] = {}
        self._probing = False
        # Rows the step's batch holds for other streams (parallel slots): drafts
        # compete with them, so they must pay for the whole step (`expected_gain`).
        self.other_rows = 0

    # --- measurements -------------------------------------------------------------

    def record_cost(self, n_tokens: int, ms: float) -> None:
        """Feeds the wall time of one decode of n_tokens rows."""
        old = self._cost_ms.get(n_tokens)
        self._cost_ms[n_tokens] = ms if old is None else old * 0.9 + ms * 0.1

    def relative_cost(self, n_tokens: int) -> float:
        one = self._cost_ms.get(1)
        measured = self._cost_ms.get(n_tokens)
        if one and measured:
            return measured / one
        return _interpolate(self._prior, n_tokens)

    @staticmethod
    def bucket(strength: int) -> int:
        return min(strength, MAX_STRENGTH_BUCKET)

    def position_acceptance(
        self, strength: int, *, drafter: DraftSource = ANY_SOURCE
    ) -> list[float]:
        """Conditional acceptance per draft position (index 0: the first draft token)."""
        key = (drafter.name, self.bucket(strength))
        table = self.stats.acceptance.get(key)
        if table is None:
            # Optimistic prior so that the first drafts get tried at all; the
            # estimates then converge quickly (EMA weight 0.2 per observation).
            table = [drafter.prior(strength)] + [0.8] * (MAX_DRAFT - 1)
            self.stats.acceptance[key] = table
        return table

    def acceptance(self, strength: int, *, drafter: DraftSource = ANY_SOURCE) -> float:
        """Estimated chance that the first draft token is accepted."""
        return self.position_acceptance(strength, drafter=drafter)[0]

    def record_draft_cost(self, ms_per_token: float, *, drafter: DraftSource = ANY_SOURCE) -> None:
        """Feeds the time a costly drafter took per drafted token."""
        old = self._draft_ms.get(drafter.name)
        self._draft_ms[drafter.name] = (
            ms_per_token if old is None else old * 0.9 + ms_per_token * 0.1
        )

    def draft_cost(self, *, drafter: DraftSource = ANY_SOURCE) -> float:
        """A drafter's cost per drafted token, relative to one target token."""
        one = self._cost_ms.get(1)
        draft_ms = self._draft_ms.get(drafter.name)
        if draft_ms is None or not one:
            return 0.1  # a typical small draft model until measured
        return draft_ms / one

    def record(
        self, strength: int, drafted: int, accepted: int, *, drafter: DraftSource = ANY_SOURCE
    ) -> None:
        """Updates acceptance from one verify step (drafted tokens, accepted prefix)."""
        if drafted <= 0:
            return
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.steps += 1
        d, a = self.stats.by_drafter.get(drafter.name, (0, 0))
        self.stats.by_drafter[drafter.name] = (d + drafted, a + accepted)
        table = self.position_acceptance(strength, drafter=drafter)
        # Each accepted token is a success at its position; the first rejection
        # is a failure; positions after it say nothing (never tested).
        for i in range(min(drafted, accepted + 1, MAX_DRAFT)):
            success = 1.0 if i < accepted else 0.0
            table[i] = table[i] * 0.8 + success * 0.2
        if self._probing:
            # A failed probe doubles the wait before the next one.
            self._probing = False
            self._probe_wait = 16 if accepted else min(self._probe_wait * 2, 1024)

    # --- decisions ----------------------------------------------------------------

    def expected_gain(self, k: int, table: Sequence[float], per_draft: float = 0.0) -> float:
        """Tokens per unit of time with k drafts, relative to plain decoding."""
        tokens, survive = 1.0, 1.0
        for i in range(k):
            survive *= table[min(i, len(table) - 1)]
            tokens += survive
        others = self.other_rows
        if others <= 0:
            return tokens / (self.relative_cost(k + 1) + k * per_draft)
        # The step also decodes `others` rows of other streams, and k drafts
        # slow every one of them: compare the whole step's tokens per unit of
        # time with and without the drafts.
        with_drafts = (others + tokens) / (self.relative_cost(others + 1 + k) + k * per_draft)
        plain = (others + 1) / self.relative_cost(others + 1)
        return with_drafts / plain

    def best_gain(self, drafter: DraftSource) -> float:
        """The best expected speed-up with a costly drafter's measured acceptance and cost."""
        table = self.position_acceptance(0, drafter=drafter)
        per_draft = self.draft_cost(drafter=drafter)
        return max(
            (self.expected_gain(k, table, per_draft) for k in range(1, max(self.n_max, 1) + 1)),
            default=1.0,
        )

    def pays(self, drafter: DraftSource) -> bool:
        """Whether a costly drafter's measured acceptance and cost make drafting pay
        (True until both are measured: it has to be tried to be judged)."""
        if drafter.name not in self._draft_ms or not self._cost_ms.get(1):
            return True
        return self.best_gain(drafter) >= self.margin

    def admit_costly(self, drafter: DraftSource) -> bool:
        """Whether a new request takes a costly drafter (a draft model, MTP heads).

        Keeping a draft model in step costs one of its evaluations per token of
        the request, drafting or not (the prompt during prompt processing, then
        what was accepted since its last draft), so one that does not pay is
        not taken at all, rather than probed. It is tried again on a later
        request, after 1, 2, 4 ... 64 requests without it, in case the texts
        got easier to draft.
        """
        name = drafter.name
        if self.pays(drafter):
            self._retry_after.pop(name, None)
            self._skipped.pop(name, None)
            return True
        skipped = self._skipped.get(name, 0) + 1
        wait = self._retry_after.get(name, 1)
        if skipped > wait:
            self._skipped[name] = 0
            self._retry_after[name] = min(wait * 2, 64)
            # A trial: its cost is measured afresh on its next drafts.
            self._draft_ms.pop(name, None)
            return True
        self._skipped[name] = skipped
        return False

    def choose(
        self,
        strength: int,
        available: int,
        per_draft: float = 0.0,
        *,
        drafter: DraftSource = ANY_SOURCE,
    ) -> int:
        """How many of the `available` drafted tokens to verify now (0: none).

        `per_draft` is the extra cost of producing each draft token, relative
        to one target decode: 0 for a cheap drafter (a lookup), `draft_cost()`
        for one that runs a model.
        """
        if available <= 0:
            self.current_k = 0
            return 0
        table = self.position_acceptance(strength, drafter=drafter)
        a = table[0]
        best_k, best_gain = 0, 1.0
        for k in range(max(1, self.n_min), min(self.n_max, available) + 1):
            gain = self.expected_gain(k, table, per_draft)
            if gain > best_gain:
                best_k, best_gain = k, gain
        if a < self.p_min:
            best_k = 0
        if best_k and best_gain >= self.margin:
            self.current_k = best_k
            return best_k
        if self.n_min > 0 and a >= self.p_min:
            self.current_k = min(self.n_min, available)
            return self.current_k
        # Speculation does not pay now: plain decoding, with a rare probe.
        self.current_k = 0
        self._cooldown += 1
        if self._cooldown >= self._probe_wait:
            self._cooldown = 0
            self._probing = True
            return min(2, available)
        return 0

    def acceptance_of(self, drafter: DraftSource) -> float | None:
        """The share of one drafter's drafted tokens accepted so far (None: none drafted)."""
        drafted, accepted = self.stats.by_drafter.get(drafter.name, (0, 0))
        return accepted / drafted if drafted else None

    @property
    def acceptance_rate(self) -> float | None:
        if not self.stats.drafted:
            return None
        return self.stats.accepted / self.stats.drafted
