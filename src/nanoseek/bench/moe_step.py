"""One MoE training step (forward + backward) of a ~20M-param DeepSeek-V3 config: nanoseek vs
transformers' DeepseekV3ForCausalLM (its default experts implementation, plus "grouped_mm" and "eager"),
same weights, same batch, same loss (mean next-token cross-entropy), in one run on this machine.

    nanoseek bench moe-step [--batch 8 --seq 256 --reps 9 --threads 1 --clock cpu --plot moe_step.png]
    (or python benchmarks/moe_step.py)

nanoseek runs twice, once per experts backend: grouped_mm (torch._grouped_mm over expert-sorted rows,
outputs combined with index_add_) and padded_bmm (one bmm over per-expert slot blocks, dispatch and combine
as gathers). Before timing, every row takes one step on the batch and the benchmark checks that all rows
agree (loss and every parameter's gradient); then the rows run alternately, --reps rounds. Prints each
row's median step time with its min–max, and its time relative to the faster nanoseek backend (per-round
ratios, median and min–max). Noisy machines: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio, relative_gap, table

# Agreement limits (fp32): both stacks compute the same function with sums in different orders; measured
# on bench-20m: loss gap ~1e-7, largest gradient gap ~1e-6 of the tensor's largest entry.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4

BACKENDS = {
    "grouped_mm": "nanoseek grouped_mm experts (index_add_ combine)",
    "padded_bmm": "nanoseek padded_bmm experts (gather combine)",
}


def build(cfg, impl: str | None):
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as exc:
        raise ValueError("this benchmark needs transformers (pip install -e '.[dev]')") from exc

    d = cfg.to_dict()
    d.pop("architectures")
    d.pop("model_type")
    kwargs = {"attn_implementation": "sdpa"}
    if impl is not None:
        kwargs["experts_implementation"] = impl
    hf_cfg = DeepseekV3Config(**d, **kwargs)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg).float().train()
    return model, hf_cfg._experts_implementation


def step_hf(model, x, y) -> float:
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    return loss.item()


def step_ours(model, x, y) -> float:
    model.zero_grad(set_to_none=True)
    out = model.compute_loss(x, y, mtp_weight=0.0)
    out.loss.backward()
    return out.loss.item()


def check_agreement(
    models: dict[str, torch.nn.Module], losses: dict[str, float], reference: str
) -> tuple[float, float]:
    """Every row's loss and gradients against `reference`'s; returns (largest loss gap, largest gradient gap),
    both relative. Raises OutputsDisagree beyond LOSS_RTOL / GRAD_RTOL."""
    ref_grads = {n: p.grad for n, p in models[reference].named_parameters()}
    loss_gap = grad_gap = 0.0
    for name, model in models.items():
        gap = relative_gap(losses[name], losses[reference])
        if gap > LOSS_RTOL:
            raise OutputsDisagree(f"{name}: loss {losses[name]:.7g} vs {reference} {losses[reference]:.7g}")
        loss_gap = max(loss_gap, gap)
        grads = {n: p.grad for n, p in model.named_parameters()}
        if grads.keys() != ref_grads.keys():
            raise OutputsDisagree(
                f"{name}: parameters differ from {reference}'s: {sorted(grads.keys() ^ ref_grads.keys())}"
            )
        for pname, g in grads.items():
            want = ref_grads[pname]
            if (g is None) != (want is None):
                raise OutputsDisagree(f"{name}: {pname} has a gradient on one side only")
            if g is None:
                continue
            gap = ((g - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            if not gap <= GRAD_RTOL:
                raise OutputsDisagree(f"{name}: gradient of {pname} differs from {reference}'s by {gap:.1e} (relative)")
            grad_gap = max(grad_gap, gap)
    return loss_gap, grad_gap


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek bench moe-step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9, help="timed rounds (each runs every row once)")
    ap.add_argument("--config", default="bench-20m", help="named model size (see nanoseek.model.config)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, spinning OpenMP threads make 2-thread timings erratic)",
    )
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU seconds (robust to other load when single-threaded); wall: elapsed time",
    )
    ap.add_argument("--plot", help="write a PNG here: each row's per-round time over the faster nanoseek's, step ms")
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:  # the caller's setting (a test, a notebook) is not ours to keep
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    import nanoseek
    from nanoseek.model.config import from_name
    from nanoseek.model.moe import set_experts_backend

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = from_name(args.config)
    ref, default_impl = build(cfg, None)
    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        for backend, name in BACKENDS.items():  # identical weights, so identical routing work
            models[name] = set_experts_backend(nanoseek.load(tmp).train(), backend)
    models[f"transformers default ({default_impl} experts)"] = ref
    models["transformers grouped_mm experts"] = build(cfg, "grouped_mm")[0]
    models["transformers eager experts (loop over experts)"] = build(cfg, "eager")[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    def step(name: str):
        fn = step_ours if name in BACKENDS.values() else step_hf
        return lambda i: fn(models[name], x, y)

    steps = {name: step(name) for name in models}
    # One step each (also the warm-up): the same loss and gradients on every row, or no timing at all.
    first = BACKENDS["grouped_mm"]
    losses = {name: fn(-1) for name, fn in steps.items()}
    loss_gap, grad_gap = check_agreement(models, losses, first)
    times, _ = alternate(steps, rounds=args.reps, warmup=0, clock=clock)

    ours = [BACKENDS[b] for b in BACKENDS]
    best = min(ours, key=lambda name: Spread.of(times[name]).median)
    tokens = args.batch * args.seq
    n_params = sum(p.numel() for p in models[first].parameters())
    print(
        f"config {args.config}: {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq} = {tokens} tokens, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}; "
        f"{args.reps} alternating rounds after one warm-up step"
    )
    print(
        f"agreement (checked before timing): loss within {loss_gap:.1e}, gradients within {grad_gap:.1e} "
        f"of the largest entry, relative to {first}"
    )
    rows = []
    for name, ts in times.items():
        spread = Spread.of(ts).scaled(1000)
        rows.append(
            [name, f"{spread.median:.1f}", f"{spread.lo:.1f}–{spread.hi:.1f}", f"{tokens / spread.median * 1000:.0f}",
             paired_ratio(times, name, best).format(unit="×")]
        )  # fmt: skip
    print(table(["implementation", "median step (ms)", "min–max (ms)", "tokens/s", "time / faster nanoseek"], rows))
    other = next(name for name in ours if name != best)
    print(f"faster nanoseek path: {best}; {other} takes {paired_ratio(times, other, best).format(unit='×')} its time")
    if args.plot:
        plot(args, times, best, tokens)


def plot(args: argparse.Namespace, times: dict[str, list[float]], best: str, tokens: int) -> None:
    """--plot: every row's per-round step time over the faster nanoseek row's, and each row's step ms."""
    from nanoseek.bench.plots import machine_note, ratio_plot, round_ratios

    short = {name: name.split(" (")[0].replace(" experts", "") for name in times}
    clock = "process CPU clock" if args.clock == "cpu" else "wall clock"
    title = f"MoE training step ({args.config}, {tokens} tokens): time / faster nanoseek ({short[best]})"
    ratio_plot(args.plot, title,
               {short[n]: round_ratios(times, n, best) for n in times if n != best},
               ylabel="step time / faster nanoseek's (per round; > 1: slower)",
               absolute={short[n]: [1000 * t for t in ts] for n, ts in times.items()}, absolute_ylabel="step (ms)",
               footnote=f"{machine_note(torch.get_num_threads(), clock)}; {args.reps} alternating rounds",
               absolute_fmt=".0f")  # fmt: skip
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
