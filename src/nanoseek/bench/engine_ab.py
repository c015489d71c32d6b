"""Two settings of the inference engine against each other for one stream's greedy decode: one process, the same
model, alternating rounds (benchmarks/kv_cache_dtype.py, benchmarks/layer_stack.py).

Before timing, both arms decode the prompt's continuation and their greedy tokens are compared; each round then
times both (the order alternating), and the ratio of decode tok/s is taken per round."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Arm:
    """One side: EngineConfig fields, and a hook that may change the engine after it is built."""

    config: dict = field(default_factory=dict)
    adjust: Callable | None = None


def decode(model, prompt: list[int], tokens: int, arm: Arm) -> tuple[float, list[int]]:
    """Decode tok/s after the first token, and the greedy tokens, of one fresh engine set up as `arm`."""
    from nanoseek.engine.engine import Engine, EngineConfig
    from nanoseek.engine.sampling import SamplingParams

    blocks = (len(prompt) + tokens) // 16 + 3
    config = EngineConfig(block_size=16, max_num_seqs=1, num_blocks=blocks, **arm.config)
    engine = Engine(model, config, eos_ids=[])
    if arm.adjust is not None:
        arm.adjust(engine)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    first = None
    while engine.has_work():
        engine.step()
        if first is None and engine.get(rid).output_ids:  # the prompt's prefill ends with the first token
            first = time.perf_counter()
    return tokens / (time.perf_counter() - first), list(engine.get(rid).output_ids)


def alternate(model, prompt: list[int], tokens: int, arms: dict[str, Arm], rounds: int, *, require_equal=False):
    """(tokens the two arms' greedy outputs agree on, of how many; ratios first / second arm of decode tok/s per
    round; each arm's tok/s per round), printing every round. require_equal: stop before timing (SystemExit)
    unless every greedy token agrees."""
    (a, arm_a), (b, arm_b) = arms.items()
    out_a, out_b = decode(model, prompt, tokens, arm_a)[1], decode(model, prompt, tokens, arm_b)[1]
    agree = next((i for i, (x, y) in enumerate(zip(out_a, out_b)) if x != y), len(out_a))
    if require_equal and out_a != out_b:
        raise SystemExit(f"{a} and {b} part at greedy token {agree} of {len(out_a)}: not timed")
    ratios, speeds = [], {a: [], b: []}
    for r in range(rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        speed = {name: decode(model, prompt, tokens, arms[name])[0] for name in order}
        ratios.append(speed[a] / speed[b])
        for name in speed:
            speeds[name].append(speed[name])
        print(f"round {r + 1}: {a} {speed[a]:.1f} tok/s, {b} {speed[b]:.1f} tok/s", flush=True)
    return (agree, len(out_a)), ratios, speeds


def parser(doc: str, quants: list[str], plot_help: str) -> argparse.ArgumentParser:
    """The scripts' shared arguments: the model, its run format, the prompt's depth, tokens, rounds, threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2", help="a .gguf file or an asset name (default smollm2)")
    p.add_argument("--quant", default=quants[0], choices=quants, help="the weights' run format")
    p.add_argument("--depth", type=int, default=200, help="prompt tokens before the decode")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens timed per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", help=plot_help)
    return p


def load(args: argparse.Namespace):
    """(the model file, the model in --quant on --threads threads, a --depth-token prompt of fixed ids)."""
    import torch

    import nanoseek
    from nanoseek.assets import resolve_model

    torch.set_num_threads(args.threads)
    path = Path(resolve_model(args.model))
    model = nanoseek.load(path, quant=None if args.quant == "none" else args.quant)
    return path, model, [(i * 7919) % 40000 + 100 for i in range(args.depth)]  # no tokenizer needed
