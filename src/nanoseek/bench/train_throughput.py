"""Training throughput on the speedrun's own batches: nanoseek's training step vs a transformers
DeepseekV3ForCausalLM training loop doing the same work, plus rows that show what each of nanoseek's
optimisations adds. The speedrun's model config (`tiny` preset, without MTP: transformers does not train
MTP heads), same initial weights, same batches, same loss, same optimizer, in one run on this machine.

    nanoseek bench train-throughput [--batch 256 --reps 20 --threads 1 --clock cpu --plot train_throughput.png]
    (or python benchmarks/train_throughput.py)

The batches are TaskBatcher's: [batch, 32] rows of one add2/sort problem each, loss on the answer only.
Every row of the table does, per step: make the batch, forward, loss, backward, gradient clipping, AdamW
(the trainer's parameter groups and hyper-parameters); nanoseek also updates its router biases, which
transformers' model does not have. The loss is the same on every row: cross-entropy averaged over the
batch's target tokens (no balance loss, no MTP).

- headline: nanoseek's Trainer step vs the transformers loop on the same trimmed rows (padding that every
  row shares is cut: exact under causal attention, and those positions have no target);
- what each optimisation adds, each measured on its own: the padding trim (on either side), and nanoseek's
  fused linear + cross-entropy (which never stores the [tokens, vocab] logits and skips ignored rows)
  against materialised logits and F.cross_entropy.

Before timing, one step from identical weights on every row must give the same loss and gradient norm
(fp32 tolerance), or the benchmark stops. Then the rows run alternately, --reps rounds; each row's median
step time is printed with its min–max, and every ratio is taken per round and given as median (min–max).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio, relative_gap, table

LOSS_RTOL = 1e-5  # measured gap between the rows on the first step: ~1e-7
GRAD_NORM_RTOL = 1e-4

TRAINER = "nanoseek Trainer step (trimmed rows, fused linear+CE)"
HF_SAME = "transformers loop (trimmed rows, logits + F.cross_entropy)"
OURS_LOOP = "nanoseek loop (trimmed rows, fused linear+CE)"
OURS_LOGITS = "nanoseek loop (trimmed rows, logits + F.cross_entropy)"
OURS_FULL = "nanoseek loop (full 32-token rows, fused linear+CE)"
HF_FULL = "transformers loop (full 32-token rows, logits + F.cross_entropy)"


def hf_from_folder(folder: Path):
    """transformers' DeepseekV3ForCausalLM from a HF folder, as a user would load it (transformers converts
    the per-expert checkpoint names to its fused runtime layout itself)."""
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError as exc:
        raise ValueError("this benchmark needs transformers (pip install -e '.[dev]')") from exc

    return DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="sdpa").float().train()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek bench train-throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="rows per step (the speedrun's batch)")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds (each runs every row once)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default, erratic when busy)"
    )
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU seconds (robust to other load when single-threaded); wall: elapsed time",
    )
    ap.add_argument("--plot", help="write a PNG here: every ratio of step times per round, each row's step ms")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.batch < 1:
        raise ValueError(f"--reps and --batch must be >= 1, got {args.reps} and {args.batch}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp()
    try:
        run(args, out)
    finally:  # the caller's thread setting and disk are not ours to keep
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)


def run(args: argparse.Namespace, out: str) -> None:
    from nanoseek.model.deepseek_v3 import IGNORE_INDEX
    from nanoseek.model.moe import update_router_bias
    from nanoseek.train.batches import trim_shared_padding
    from nanoseek.train.build import build_optimizer
    from nanoseek.train.config import load_train_config
    from nanoseek.train.trainer import Trainer

    cfg = load_train_config(
        preset="tiny",
        overrides=[f"out_dir={out}", f"batch_size={args.batch}", "model.num_nextn_predict_layers=0", "mtp_weight=0",
                   "balance_alpha=0", "data.tasks=[add2,sort]", "data.task_weights=[0.75,0.25]",
                   "time_budget_min=null"],
    )  # fmt: skip
    trainer = Trainer(cfg, show_progress=False)
    trainer._setup()
    batcher = trainer.source.tasks
    lr = cfg.optim.lr
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def fused_loss(model, x, y):
        return model.compute_loss(x, y, mtp_weight=0.0).loss

    def logits_loss(model, x, y):
        logits = model(x)  # nanoseek's forward returns the [B, T, vocab] logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    def hf_loss(model, x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    def loop(model, loss_fn: Callable, trim: bool, router_bias: bool) -> Callable[[int], tuple[float, float]]:
        opt = build_optimizer(model, cfg, torch.device("cpu"))

        def step(i: int) -> tuple[float, float]:
            x, y = batcher.batch_at(i)
            if trim:
                x, y = trim_shared_padding(x, y)
            loss = loss_fn(model, x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if router_bias:
                update_router_bias(model, gamma=cfg.router_bias_gamma)
            return loss.item(), norm.item()

        return step

    def trainer_step(i: int) -> tuple[float, float]:
        rec = trainer._train_step(i, lr)
        return rec["loss"], rec["grad_norm"]

    from nanoseek.weights.hf_folder import save_pretrained

    start = copy.deepcopy(trainer.model)  # every row starts from these weights
    save_pretrained(start, Path(out) / "start")
    steps = {
        TRAINER: trainer_step,
        HF_SAME: loop(hf_from_folder(Path(out) / "start"), hf_loss, trim=True, router_bias=False),
        OURS_LOOP: loop(copy.deepcopy(start), fused_loss, trim=True, router_bias=True),
        OURS_LOGITS: loop(copy.deepcopy(start), logits_loss, trim=True, router_bias=True),
        OURS_FULL: loop(copy.deepcopy(start), fused_loss, trim=False, router_bias=True),
        HF_FULL: loop(hf_from_folder(Path(out) / "start"), hf_loss, trim=False, router_bias=False),
    }
    # Round 0 (warm-up): identical weights and batch on every row, so the same loss and gradient norm.
    first_round: dict[str, tuple[float, float]] = {}
    for name, fn in steps.items():
        first_round[name] = fn(0)
    loss_gap, norm_gap = check_first_step(first_round)
    times, _ = alternate(steps, rounds=args.reps, warmup=1, clock=clock)  # batches 0, 1, ... again

    x, y = batcher.batch_at(0)
    kept = trim_shared_padding(x, y)[0].shape[1]
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(
        f"tiny preset: {n_params / 1e6:.2f}M params (no MTP), {args.batch} rows x {x.shape[1]} tokens "
        f"(the trim keeps {kept} on step 0), {torch.get_num_threads()} threads, {args.clock} clock, "
        f"torch {torch.__version__}; {args.reps} alternating rounds after 2 warm-up rounds"
    )
    print(
        f"agreement (first step, identical weights): losses within {loss_gap:.1e}, "
        f"gradient norms within {norm_gap:.1e} (relative); loss {first_round[TRAINER][0]:.5f}"
    )
    rows = []
    for name, ts in times.items():
        spread = Spread.of(ts).scaled(1000)
        rows.append(
            [name, f"{spread.median:.1f}", f"{spread.lo:.1f}–{spread.hi:.1f}",
             f"{args.batch / spread.median * 1000:.0f}", paired_ratio(times, name, TRAINER).format(unit="×")]
        )  # fmt: skip
    print(table(["training step", "median (ms)", "min–max (ms)", "rows/s", "time / nanoseek Trainer step"], rows))
    print()
    ratios = [  # (what it measures, numerator row, denominator row): > 1 means the denominator is faster
        ("same work: transformers loop / nanoseek Trainer step (headline)", HF_SAME, TRAINER),
        ("padding trim alone, nanoseek: full rows / trimmed rows", OURS_FULL, OURS_LOOP),
        ("padding trim alone, transformers: full rows / trimmed rows", HF_FULL, HF_SAME),
        ("fused linear+CE alone, nanoseek: logits + F.cross_entropy / fused", OURS_LOGITS, OURS_LOOP),
        ("model alone, both with logits + F.cross_entropy: transformers / nanoseek", HF_SAME, OURS_LOGITS),
        ("Trainer bookkeeping: Trainer step / bare nanoseek loop", TRAINER, OURS_LOOP),
    ]
    print(table(["ratio of step times", "median (min–max) over rounds"],
                [[what, paired_ratio(times, a, b).format(unit="×")] for what, a, b in ratios]))  # fmt: skip
    if args.plot:
        plot(args, times, ratios)


def plot(args: argparse.Namespace, times: dict[str, list[float]], ratios: list[tuple[str, str, str]]) -> None:
    """--plot: every ratio of the printed table per round (numerator row / denominator row), each row's step ms."""
    from nanoseek.bench.plots import machine_note, ratio_plot, round_ratios

    short = {TRAINER: "Trainer", HF_SAME: "transformers", OURS_LOOP: "nanoseek loop", OURS_LOGITS: "loop, logits",
             OURS_FULL: "loop, full rows", HF_FULL: "transformers, full rows"}  # fmt: skip
    clock = "process CPU clock" if args.clock == "cpu" else "wall clock"
    ratio_plot(args.plot, f"training throughput, tiny preset, {args.batch} rows a step: ratios of step times",
               {what.split(":")[0]: round_ratios(times, a, b) for what, a, b in ratios},
               ylabel="ratio of step times (per round; > 1: the second row faster)",
               absolute={short[n]: [1000 * t for t in ts] for n, ts in times.items()}, absolute_ylabel="step (ms)",
               footnote=f"{machine_note(torch.get_num_threads(), clock)}; {args.reps} alternating rounds; ratios "
                        "as in the printed table (e.g. same work: transformers loop / nanoseek Trainer step)",
               absolute_fmt=".0f")  # fmt: skip
    print(f"plot: {args.plot}")


def check_first_step(first: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """Largest relative gaps of the first step's (loss, gradient norm) to the Trainer's; raises beyond limits."""
    want_loss, want_norm = first[TRAINER]
    loss_gap = norm_gap = 0.0
    for name, (loss, norm) in first.items():
        lg, ng = relative_gap(loss, want_loss), relative_gap(norm, want_norm)
        if lg > LOSS_RTOL or ng > GRAD_NORM_RTOL:
            raise OutputsDisagree(
                f"{name}: first-step loss {loss:.7g} / gradient norm {norm:.7g} vs the Trainer's "
                f"{want_loss:.7g} / {want_norm:.7g}: the rows would not time the same work"
            )
        loss_gap, norm_gap = max(loss_gap, lg), max(norm_gap, ng)
    return loss_gap, norm_gap


if __name__ == "__main__":
    main()
