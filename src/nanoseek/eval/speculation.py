"""How much a DeepSeek model's own MTP module speeds up its greedy decoding (the speedrun's report card).

The same prompts are decoded one at a time (a chat's single stream, where speculation pays) by a plain engine
and by one whose MTP module drafts `num_speculative_tokens` tokens a step (engine/speculative.py), in
alternating rounds in one process. One draft by default, as many as the model has MTP depths: further drafts
re-apply depth 1 to its own guesses, and were accepted far less often (the speedrun's final model, 6 held-out
problems: 60% of single drafts accepted, 42% with 2 a step, 23% with 4). Reported: each side's tokens per second
(median over the rounds, with the spread), the drafts proposed and accepted, and whether the two gave the same
tokens, which greedy speculation must (the target model verifies every draft). The clock is injected, so tests
need not time anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn


@dataclass
class SpeculationResult:
    plain_tok_s: list[float]  # per round
    mtp_tok_s: list[float]
    tokens: int  # generated per round (the same on both sides when the outputs agree)
    drafted: int  # MTP drafts proposed over all rounds
    accepted: int  # ... and accepted by the target model
    same_output: bool  # every round's tokens equal the plain engine's

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def speedup(self) -> float:
        """Median MTP tokens/s over median plain tokens/s."""
        return statistics.median(self.mtp_tok_s) / statistics.median(self.plain_tok_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance": self.acceptance, "speedup": self.speedup}


def measure_mtp_speculation(
    model: nn.Module,
    prompts: Sequence[list[int]],
    eos_ids: Sequence[int],
    max_new_tokens: int,
    *,
    rounds: int = 3,
    num_speculative_tokens: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> SpeculationResult | None:
    """Greedy decoding of `prompts`, one at a time, without and with MTP speculation, `rounds` times each
    (alternating which goes first). None for a model without MTP modules."""
    from nanoseek.engine.engine import Engine, EngineConfig
    from nanoseek.engine.sampling import SamplingParams

    if not getattr(model, "mtp", None):
        return None
    if rounds < 1 or not prompts:
        raise ValueError("measuring speculation needs at least one round and one prompt")
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    rates: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[list[int]]]] = {False: [], True: []}
    drafted = accepted = 0
    for r in range(rounds):
        for mtp in (False, True) if r % 2 == 0 else (True, False):
            config = EngineConfig(max_num_seqs=1, speculative="mtp" if mtp else None,
                                  num_speculative_tokens=num_speculative_tokens)  # fmt: skip
            engine = Engine(model, config, eos_ids=list(eos_ids))
            start = clock()
            out = [engine.generate([list(p)], params)[0].token_ids for p in prompts]
            seconds = clock() - start
            outputs[mtp].append(out)
            rates[mtp].append(sum(map(len, out)) / max(seconds, 1e-9))
            stats = engine.stats()
            drafted, accepted = drafted + stats["num_drafted"], accepted + stats["num_accepted"]
    plain = outputs[False][0]
    same = all(out == plain for side in outputs.values() for out in side)
    return SpeculationResult(rates[False], rates[True], sum(map(len, plain)), drafted, accepted, same)
