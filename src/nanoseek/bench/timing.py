"""How the benchmarks time and report: rows run alternately, repeated, summarised as median with min–max.

    times = alternate({"ours": step_a, "peer": step_b}, rounds=9, warmup=1, clock=time.process_time)
    print(table(["implementation", ...], rows))            # a Markdown table (pasted into RESULTS.md as is)
    speedup = paired_ratio(times, "peer", "ours")           # per-round time ratios, median (min–max)

Each round runs every row once, in an order rotated by one each round, so no row always runs first (cold
caches) or right after the same neighbour. A ratio is taken per round (the two rows ran seconds apart,
under the same machine load) and summarised over rounds; that is steadier than a ratio of medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    """The median of some repeated measurements and their range."""

    median: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.lo * factor, self.hi * factor)

    def format(self, digits: int = 2, unit: str = "") -> str:
        """e.g. "1.12× (1.05–1.20)" with unit="×"."""
        return f"{self.median:.{digits}f}{unit} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


def alternate(
    steps: dict[str, Callable[[int], Any]],
    rounds: int,
    warmup: int,
    clock: Callable[[], float],
    after_warmup: Callable[[dict[str, list[Any]]], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Run each step `warmup + rounds` times, alternating rows in a rotating order; step(i) gets the round
    index i (0-based, warm-up included). Returns (each row's durations after warm-up, each row's return
    values in every round). `after_warmup(results)` runs once, after the warm-up rounds and before the first
    timed one: where a benchmark checks that the sides agree, a disagreement stops it before any timing."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        if i == warmup and after_warmup is not None:
            after_warmup(results)
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            results[name].append(steps[name](i))
            dt = clock() - t0
            if i >= warmup:
                times[name].append(dt)
    return times, results


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> Spread:
    """times[numerator] / times[denominator], round by round: > 1 means `denominator` is faster."""
    return Spread.of([a / b for a, b in zip(times[numerator], times[denominator], strict=True)])


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def relative_gap(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude (0 when both are 0); inf if either is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def matching_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (tokens, characters) two outputs share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class OutputsDisagree(AssertionError):
    """The benchmark's sides did not compute the same thing: its timings would compare different work."""
