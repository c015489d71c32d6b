"""Do two sides compute the same thing? Checked once per side BEFORE any timing, so a benchmark never reports a
ratio between runs of different work.

The measure is teacher-forced greedy agreement: over N positions of a fixed text, each side is given the text
up to the position (the same token ids for every side) and picks its greedy next token (temperature 0, one
token); the agreement is the fraction of positions where the two picks are equal. Unlike the matching prefix
of two free greedy runs, it does not collapse at the first near tie (one different pick sends two free runs
down different texts: SmolLM2 Q4_1's greedy outputs in nanoseek int4 and llama.cpp matched for 2 to 20 tokens
from run to run, benchmarks/RESULTS.md), and every position is scored on the same context.

Two runs of the same weights in different kernels (nanoseek's int4 with int8 activations against llama.cpp's
Q4_1 with Q8_1 activations) part only where two candidates are close. Measured on SmolLM2-135M Q4_1 at the
first 32 positions (2026-12-06): `nanoseek serve` (int4) and llama-server picked the same token at 28 (88%;
`nanoseek bench serve smollm2 --quick --peers llama-server --threads 1`), where the free greedy continuations
of the same prompt shared 0 of 8 tokens (a near tie at the first); in `nanoseek bench decode`, int4 28 and
int8 (a lossier format than the file's) 24 (75%) against llama-server of llama-bench's build. A broken kernel,
another tokenizer or another file picks otherwise at most positions. DEFAULT_THRESHOLD (60%) sits below the
lossiest format measured, with room for other files and CPUs; --agreement-threshold moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_POSITIONS = 64  # positions of the text scored (one greedy token each)
DEFAULT_CONTEXT = 24  # tokens of the text before the first scored position
DEFAULT_THRESHOLD = 0.6  # the fraction of positions at which two sides must pick the same token


def teacher_forced_prefixes(ids: Sequence[int], positions: int, context: int = DEFAULT_CONTEXT) -> list[list[int]]:
    """The prompts of the check: the text's first `context + k` tokens for k = 0 .. positions-1."""
    if context < 1 or positions < 1:
        raise ValueError("the agreement check needs a context and positions >= 1")
    if len(ids) < context + positions:
        raise ValueError(f"the text has {len(ids)} tokens; the agreement check needs {context + positions}")
    return [list(ids[: context + k]) for k in range(positions)]


def picks(next_token: Callable[[list[int]], object], prefixes: list[list[int]]) -> list:
    """A side's greedy pick after each prefix (`next_token` asks the side for one token at temperature 0)."""
    return [next_token(prefix) for prefix in prefixes]


def agreement(a: Sequence, b: Sequence) -> float:
    """The fraction of positions at which two sides picked the same token."""
    if len(a) != len(b) or not a:
        raise ValueError(f"picks of different lengths or none ({len(a)} and {len(b)})")
    return sum(x == y for x, y in zip(a, b)) / len(a)


@dataclass(frozen=True)
class Agreement:
    """Two sides' teacher-forced greedy agreement, and the threshold it must reach before timing."""

    side: str
    peer: str
    equal: int
    positions: int
    threshold: float

    @classmethod
    def of(cls, side: str, peer: str, ours: Sequence, theirs: Sequence, threshold: float) -> Agreement:
        return cls(side, peer, round(agreement(ours, theirs) * len(ours)), len(ours), threshold)

    @property
    def fraction(self) -> float:
        return self.equal / self.positions

    @property
    def ok(self) -> bool:
        return self.fraction >= self.threshold

    def line(self) -> str:
        verdict = "ok" if self.ok else "BELOW the threshold"
        return (
            f"{self.side} vs {self.peer}: the same greedy next token at {self.equal} of {self.positions} "
            f"teacher-forced positions ({self.fraction:.0%}; threshold {self.threshold:.0%}: {verdict})"
        )

    def refusal(self) -> str:
        return (f"{self.line()}: the two sides do not compute the same thing, so no ratio between them is "
                "reported (a different model or tokenizer, or a broken kernel?); "
                "--agreement-threshold sets the bar")  # fmt: skip


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--agreement-threshold must be between 0 and 1, got {threshold}")
    return threshold
