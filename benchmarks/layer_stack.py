"""The layer stack (engine/layer_stack.DenseStack: every decoder layer in one native op) against the model's own
layer loop, for one stream's eager greedy decode, in one process on the same quantized model, alternating rounds.

    python benchmarks/layer_stack.py                          # SmolLM2-135M Q4_1 as int4, 200-token prompt
    python benchmarks/layer_stack.py --rounds 10 --plot benchmarks/layer_stack.png

Before timing, both decode the prompt's continuation and the greedy tokens are compared (the stack calls the same
ops in the same order: they must be equal, and the run stops when they are not). Then each round times both (the
order alternating) and the ratio stack / layer loop of decode tok/s is taken per round: median (min-max)."""

from __future__ import annotations

import statistics

from nanoseek.bench.engine_ab import Arm, alternate, load, parser


def without_stack(engine) -> None:
    engine.runner.layer_stack = None  # the model then runs its layers itself (model/dense.forward_hidden)


def main() -> int:
    args = parser(
        __doc__, ["int4", "fp16", "none"], "write a PNG here: the per-round ratios and both sides' tok/s"
    ).parse_args()
    path, model, prompt = load(args)
    arms = {"stack": Arm(), "layer loop": Arm(adjust=without_stack)}
    (agree, total), ratios, speeds = alternate(model, prompt, args.tokens, arms, args.rounds, require_equal=True)
    print(f"{path.name} {args.quant}, {args.threads} threads, {args.depth}-token prompt, {args.tokens} tokens a round: "
          f"greedy tokens equal for {agree} of {total}; stack / layer loop decode tok/s per round: "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    if args.plot:
        from nanoseek.bench.plots import machine_note, ratio_plot

        ratio_plot(args.plot, f"Layer stack: {path.name} {args.quant}, {args.depth}-token prompt, decode tok/s",
                   {"stack / layer loop": ratios}, ylabel="decode tok/s ratio (per round)",
                   absolute=speeds, absolute_ylabel="decode tok/s", absolute_fmt=".1f",
                   footnote=f"{machine_note(args.threads, 'wall clock')}; {args.tokens} greedy tokens a round, "
                            f"{args.rounds} alternating rounds; greedy tokens equal for {agree} of {total}",
                   )  # fmt: skip
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
