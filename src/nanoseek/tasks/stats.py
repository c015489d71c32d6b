"""pass@k and the 95% confidence intervals the eval reports.

    pass_at_k(n=10, c=3, k=1)      # 0.3: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)
    wilson_ci95(k=40, n=50)        # one binary outcome per problem (greedy pass@1, multiple-choice accuracy)
    bootstrap_ci95(per_problem)    # a mean of per-problem values (pass@k from n samples): resample problems
    paired_difference_ci95(a, b)   # two models on the same problems: the difference of their accuracies

Which interval a number carries is recorded beside it ("wilson" or "bootstrap"), so a reader knows what it means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import comb

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "bootstrap_ci95", "paired_difference_ci95", "pass_at_k", "wilson_ci95"]

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


def paired_difference_ci95(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float, float]:
    """(accuracy of a - accuracy of b, and its 95% interval) for two models' verdicts on the SAME problems.

    Two models fine-tuned from one parent agree on most problems, so the difference of their accuracies varies
    far less than two independent samples would: only the problems one solves and the other misses move it.
    Separate Wilson intervals ignore that pairing. This is Newcombe's hybrid score interval for paired
    proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10): each accuracy's Wilson interval,
    combined with the correlation phi of the 2x2 table of (a right?, b right?)."""
    if len(a) != len(b):
        raise ValueError(f"paired verdicts need the same problems: {len(a)} against {len(b)}")
    n = len(a)
    if n == 0:
        return (0.0, -1.0, 1.0)
    both = sum(1 for x, y in zip(a, b) if x and y)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - a_only - b_only
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    (l1, u1), (l2, u2) = wilson_ci95(both + a_only, n), wilson_ci95(both + b_only, n)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (d, max(-1.0, lo), min(1.0, hi))


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
