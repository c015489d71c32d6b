"""pass@k and the 95% confidence intervals the eval reports.

    pass_at_k(n=10, c=3, k=1)      # 0.3: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)
    wilson_ci95(k=40, n=50)        # one binary outcome per problem (greedy pass@1, multiple-choice accuracy)
    bootstrap_ci95(per_problem)    # a mean of per-problem values (pass@k from n samples): resample problems

Which interval a number carries is recorded beside it ("wilson" or "bootstrap"), so a reader knows what it means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_ci95", "pass_at_k", "wilson_ci95"]

BOOTSTRAP_RESAMPLES = 2000


def wilson_ci95(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n trials ((0, 1) when n == 0)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_ci95 needs 0 <= k <= n, got k={k}, n={n}")
    z = 1.959963984540054
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, center - half), min(1.0, center + half)
    return (0.0 if k == 0 else lo, 1.0 if k == n else hi)  # exact at the edges, no rounding residue


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n (c of them correct) is
    correct: 1 - C(n-c, k) / C(n, k), unbiased for the model's pass@k (Chen et al., 2021, "Codex")."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (samples per problem), got n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def bootstrap_ci95(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-problem `values`, resampling problems with
    replacement (seeded: the same values give the same interval). (0, 1) when there are no values."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))
