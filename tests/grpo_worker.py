"""`nanoseek grpo` with one more reward, `length`, which a random model's completions differ in (the rule rewards
give them all 0, so nothing would be learned): tests/test_grpo.py runs it under torchrun."""

from __future__ import annotations

import sys


def length_reward(completion, example, task) -> float:
    return len(completion) / 10


if __name__ == "__main__":
    from nanoseek.cli import main
    from nanoseek.tasks.rewards import REWARDS

    REWARDS["length"] = length_reward
    raise SystemExit(main(["grpo", *sys.argv[1:]]))
