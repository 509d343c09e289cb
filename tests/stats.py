"""A two-sample chi-square test for the speculative tests: does speculation keep the
distribution of sampled answers (docs/architecture.md, "Why speculation is lossless")?"""

from __future__ import annotations

import math
from collections import Counter

# Critical value at p = 0.0001: small cells make the statistic's tail heavier
# than chi-square's, hence the strict level.
Z = 3.72


def chi_square(
    plain: Counter[str], spec: Counter[str], n: int
) -> tuple[float, float, list[tuple[int, int]]]:
    """The statistic, its critical value and the cells, for two samples of n answers each,
    over outcomes seen at least 5 times overall (the rest pooled into one cell)."""
    keys = [k for k in set(plain) | set(spec) if plain[k] + spec[k] >= 5]
    rest_p = n - sum(plain[k] for k in keys)
    rest_s = n - sum(spec[k] for k in keys)
    cells = [(plain[k], spec[k]) for k in keys] + ([(rest_p, rest_s)] if rest_p + rest_s else [])
    chi2 = sum((a - b) ** 2 / (a + b) for a, b in cells if a + b)
    dof = max(len(cells) - 1, 1)
    # Wilson-Hilferty approximation of the chi-square quantile.
    critical = dof * (1 - 2 / (9 * dof) + Z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2, critical, cells
