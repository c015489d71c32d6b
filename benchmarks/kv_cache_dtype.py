"""The KV cache's dtype: fp16 (`--kv-cache-dtype auto` for quantized models) against fp32 (`model`) for one
stream's greedy decode, in one process on the same quantized model, alternating rounds.

    python benchmarks/kv_cache_dtype.py                          # SmolLM2-135M Q4_1 as int4, 200-token prompt
    python benchmarks/kv_cache_dtype.py --depth 1000 --rounds 10 --plot kv_cache_dtype_1000.png

Before timing, both caches decode the prompt's continuation and the greedy tokens are compared (they may part
where two candidates nearly tie: the fp16 cache rounds every key and value once); the report says for how many
tokens they agree. Then each round times both (the order alternating) and the ratio fp16 / fp32 of decode tok/s
is taken per round: median (min–max)."""

from __future__ import annotations

import argparse
import statistics

from nanoseek.bench.engine_ab import Arm, alternate, load, parser


def main() -> int:
    args = parser(
        __doc__, ["int4", "int8", "fp16"], "write a PNG here: the per-round fp16 / fp32 ratios and both caches' tok/s"
    ).parse_args()
    path, model, prompt = load(args)
    arms = {"fp16": Arm({"kv_cache_dtype": "fp16"}), "model": Arm({"kv_cache_dtype": "model"})}
    (agree, total), ratios, speeds = alternate(model, prompt, args.tokens, arms, args.rounds)
    print(f"{path.name} {args.quant}, {args.threads} threads, {args.depth}-token prompt, {args.tokens} tokens a round: "
          f"greedy tokens equal for {agree} of {total}; fp16 / fp32 cache decode tok/s per round: "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if args.plot:
        plot(args, path.name, ratios, speeds, f"greedy tokens equal for {agree} of {total}")
    return 0


def plot(args: argparse.Namespace, model: str, ratios: list[float], speeds: dict[str, list[float]], note: str) -> None:
    """--plot: the per-round fp16 / fp32 cache ratios of decode tok/s, and both caches' tok/s."""
    from nanoseek.bench.plots import machine_note, ratio_plot

    ratio_plot(args.plot, f"KV cache dtype: {model} {args.quant}, {args.depth}-token prompt, decode tok/s",
               {"fp16 / fp32 cache": ratios}, ylabel="decode tok/s ratio (per round)",
               absolute={"fp16 cache": speeds["fp16"], "fp32 cache": speeds["model"]},
               absolute_ylabel="decode tok/s", absolute_fmt=".1f",
               footnote=f"{machine_note(args.threads, 'wall clock')}; {args.tokens} greedy tokens a round, "
                        f"{args.rounds} alternating rounds; {note}",
               )  # fmt: skip
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    raise SystemExit(main())
