"""LoRA SFT vs full SFT: conversations per second and peak memory, on the same model and data, in one run.

    nanoseek bench sft --lora [--model smollm2|tiny|PATH] [--batch 8 --reps 6 --threads 1 --clock cpu]

Both sides are nanoseek's SFT trainer step (train/sft.py) from the same weights on the same conversations
(bench/sft.py's generated chat set; step i takes the same `--batch` conversations on both sides): full SFT
trains every weight (AdamW over all of them), LoRA SFT (train/lora_training.py, its defaults: rank 16 on the
attention and MLP projections) trains the adapter alone on the frozen model, so its backward computes no
weight gradient for the base and its optimizer state is the adapter's. Each side keeps its own default
learning rate (2e-5 full, 2e-4 LoRA; the rate does not change the work). The sides alternate, --reps rounds
after a warm-up round; the result is conversations per second, median (min–max), and the per-round ratio.
LoRA's base is what `lora.base_format` picks, auto by default: 4-bit (QLoRA-style: the frozen base's forward
on nanoseek's 4-bit kernel, model/lora.py) when its weights are on the 4-bit grid already, as SmolLM2's Q4_1
file's are, so its step-0 loss differs from full SFT's by that forward's rounding of the activations; `--set
lora.base_format=fp32` measures the fp32 base.

Peak memory: each side's is measured in a child process of its own (load the model, set up the trainer, hand
freed heap back, reset the peak RSS, run --memory-steps steps: the peak of the training steps, not of
loading, which dequantizing a GGUF makes higher than either), beside the bytes of the training state
(weights, gradients, AdamW's two moments) that the sides keep.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio, table

FULL, LORA = "full SFT (every weight)", "LoRA SFT (adapter only)"
# step 0's losses agree to this (relative) by lora.base_format: fp32 the same numbers up to float order; int4
# the base's forward on the 4-bit kernel, activations rounded to int8 per block of 32. Measured on SmolLM2 Q4_1
# (its wrapped weights on the 4-bit grid exactly), the default data's first 8 batches from the same weights:
# 1.4e-3..1.1e-2 relative (step 0: 6.7e-3, 0.5811 vs 0.5772), so 2e-2; a wrong base is off by far more.
STEP0_TOLERANCE = {"fp32": 1e-4, "int4": 2e-2}


def build(args: argparse.Namespace, out: Path, lora: bool):
    """A set-up SFT trainer of one side, on its own copy of the model."""
    from nanoseek.bench.sft import generated_chats, load_model
    from nanoseek.train.sft import prepare_sft

    model, tok, label = load_model(args.model)
    sets = [f"batch_size={args.batch}", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "ckpt_every=0",
            "max_steps=100000", "log_every=100000", "peak_flops=1e11", *args.set]  # fmt: skip
    trainer = prepare_sft(model, generated_chats(args.conversations), out / ("lora" if lora else "full"), sets,
                          tokenizer=tok, show_progress=False, lora=lora)  # fmt: skip
    trainer._setup()
    return trainer, label


def state_bytes(trainer) -> int:
    """Trained weights' gradients and AdamW moments (2 per trained weight) plus every weight, in bytes."""
    params = {id(p): p for p in trainer.model.parameters()}.values()
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return sum(p.numel() * p.element_size() for p in params) + 3 * trained


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def release_and_reset_peak() -> bool:
    """Hand freed heap back to the OS (glibc's malloc_trim) and reset VmHWM to the current RSS (Linux >= 4.0), so
    that the next peak is the training steps' own: loading a GGUF (dequantizing it) peaks higher than training
    and would otherwise be the peak of both sides. False where it cannot (then the peak includes the loading)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    """One side in this process: print its RSS (MiB) after set-up and its peak RSS over --memory-steps steps."""
    out = Path(tempfile.mkdtemp())
    try:
        trainer, _ = build(args, out, args.child == "lora")
        reset = release_and_reset_peak()
        loaded = status_mib("VmRSS")
        for i in range(args.memory_steps):
            trainer._train_step(i, trainer.cfg.optim.lr)
        peak = status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"PEAK {loaded:.0f} {peak:.0f} {state_bytes(trainer)}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, tuple[float, float, int]]:
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads, 1))}
    for name, side in ((FULL, "full"), (LORA, "lora")):
        proc = subprocess.run([sys.executable, "-m", "nanoseek.bench.sft_lora", *argv, "--child", side],
                              capture_output=True, text=True, env=env)  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith("PEAK ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"the {side} memory run failed:\n{proc.stderr[-2000:]}")
        loaded, peak, state = lines[-1].split()[1:]
        out[name] = (float(loaded), float(peak), int(state))
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    from nanoseek.bench.sft import add_common_arguments

    ap = argparse.ArgumentParser(prog="nanoseek bench sft --lora", description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--memory-steps", type=int, default=2, help="steps each memory child runs (0: no memory runs)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="an SFT setting for both sides (lora.* for the LoRA side only), e.g. --set lora.rank=8",
    )  # fmt: skip
    ap.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.batch, args.reps, args.conversations) < 1 or args.memory_steps < 0:
        raise ValueError("--batch, --reps and --conversations must be >= 1, --memory-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.child:
            if args.child == "full":
                args.set = [s for s in args.set if not s.startswith("lora.")]
            return child(args)
        out = Path(tempfile.mkdtemp())
        try:
            run(args, argv, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    finally:  # the caller's thread setting is not ours to keep
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str], out: Path) -> None:
    lora_sets = list(args.set)
    args.set = [s for s in lora_sets if not s.startswith("lora.")]
    full, label = build(args, out, lora=False)
    args.set = lora_sets
    lora, _ = build(args, out, lora=True)
    assert full.source.step_indices(0) == lora.source.step_indices(0)  # the same conversations at each step

    def step(trainer):
        return lambda i: trainer._train_step(i, trainer.cfg.optim.lr)["loss"]

    # step 0 starts from the same weights (the adapter's B is 0): the same loss on both sides, up to the 4-bit
    # kernel's rounding of the activations with lora.base_format=int4 (STEP0_TOLERANCE); checked on the warm-up
    # round, before any timing
    ran = "int4" if lora.base_packed else "fp32"  # what lora.base_format (auto by default) picked
    tolerance = STEP0_TOLERANCE[ran]

    def check_step0(losses: dict[str, list[float]]) -> None:
        full0, lora0 = losses[FULL][0], losses[LORA][0]
        if abs(full0 - lora0) > tolerance * abs(full0):
            raise OutputsDisagree(f"step 0 losses differ by more than {tolerance:g} relative: full {full0:.6g}, "
                                  f"LoRA {lora0:.6g} (stopped before timing)")  # fmt: skip

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    times, losses = alternate({FULL: step(full), LORA: step(lora)}, rounds=args.reps, warmup=1, clock=clock,
                              after_warmup=check_step0)  # fmt: skip
    load_after = os.getloadavg()[0]
    memory = measure_memory(args, argv) if args.memory_steps else {}

    trained = {n: sum(p.numel() for p in {id(p): p for p in t.model.parameters()}.values() if p.requires_grad)
               for n, t in ((FULL, full), (LORA, lora))}  # fmt: skip
    print(
        f"{label}; {len(full.plan.examples)} generated chats, {args.batch} per step; {torch.get_num_threads()} "
        f"thread(s), {args.clock} clock, torch {torch.__version__}; {args.reps} alternating rounds after 1 warm-up; "
        f"load average {load_before:.1f} -> {load_after:.1f} (shared machine); LoRA: rank {lora.lora.rank}, "
        f"alpha {lora.lora.alpha:g}, dropout {lora.lora.dropout:g}, {len(lora.lora_paths)} linears, base "
        f"{ran} (lora.base_format={lora.lora.base_format})"
    )
    print("losses per step (full / LoRA): " + " ".join(
        f"{a:.4f}/{b:.4f}" for a, b in zip(losses[FULL], losses[LORA])))  # fmt: skip
    rows = []
    for name, ts in times.items():
        spread = Spread.of(ts)
        row = [name, f"{trained[name] / 1e6:.2f}M", f"{spread.median:.2f}", f"{spread.lo:.2f}–{spread.hi:.2f}",
               f"{args.batch / spread.median:.2f}"]  # fmt: skip
        if memory:
            loaded, peak, state = memory[name]
            row += [f"{state / 2**20:.0f}", f"{loaded:.0f}", f"{peak:.0f}"]
        rows.append(row)
    header = ["SFT step", "trained params", "median (s)", "min–max (s)", "conversations/s"]
    if memory:
        header += ["weights+grads+AdamW (MiB)", "RSS after set-up (MiB)", f"peak RSS, {args.memory_steps} steps (MiB)"]
    print(table(header, rows))
    speedup = paired_ratio(times, FULL, LORA)
    print(f"\nconversations/s, LoRA / full SFT (per-round time ratio): {speedup.format(unit='×')}")
    if args.plot:
        from nanoseek.bench.sft import plot

        plot(args, f"LoRA SFT vs full SFT, {label}", times, FULL, LORA,
             f"LoRA rank {lora.lora.rank}, dropout {lora.lora.dropout:g}")  # fmt: skip


if __name__ == "__main__":
    main()
