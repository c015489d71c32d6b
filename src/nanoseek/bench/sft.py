"""Supervised fine-tuning speed: nanoseek's SFT trainer step vs a plain transformers training loop, on the
same model, data and batches, in one run.

    nanoseek bench sft [--model smollm2|tiny|PATH] [--batch 8 --reps 6 --threads 1 --clock cpu --plot sft.png]
    (or python benchmarks/sft.py)

Both sides start from the same weights (the model as nanoseek loads it, exported with save_pretrained and
read back by transformers' AutoModelForCausalLM) and take, at step i, the same `--batch` conversations of a
generated chat data set (arithmetic, counting, spelling; one or two turns; rendered with the model's chat
template; loss on the assistant's tokens).

- nanoseek: the SFT trainer's own step (train/sft.py): conversations packed into rows without padding,
  block-diagonal attention, fused linear + cross-entropy on the assistant positions only, AdamW.
- plain loop: what a user writes with transformers: right-padded batch with an attention mask, labels -100
  off the assistant tokens, `model(input_ids, attention_mask=..., labels=...).loss`, backward, AdamW.

Both: the same learning rate (constant), betas, eps, no weight decay, gradient clipping at 1.0, a loss that is
the mean over the step's assistant tokens. The two loss curves must agree on the first steps (step 0
within LOSS_RTOL: identical weights and batch; then within CURVE_RTOL as float rounding compounds through
AdamW), checked on --check-steps untimed steps BEFORE timing (they are the warm-up too), or the benchmark
stops. Then the sides alternate, --reps timed rounds going on from there, and the result is conversations per
second, median (min–max), and the per-round time ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench.timing import OutputsDisagree, Spread, alternate, paired_ratio, relative_gap, table

LOSS_RTOL = 1e-4  # step 0: same weights, same batch (measured ~1e-6 on the tiny model, fp32)
CURVE_RTOL = 0.02  # the first --check-steps steps: AdamW amplifies rounding differences a little
NANOSEEK = "nanoseek SFT step (packed rows, fused linear+CE)"
PLAIN = "transformers loop (padded batch, labels=)"


# ---- data --------------------------------------------------------------------------------------------
def generated_chats(n: int, seed: int = 0) -> list[dict]:
    """`n` short chats of varied length (10 to ~150 tokens of reply), deterministic in `seed`."""
    rng = random.Random(seed)
    words = ["banana", "keyboard", "river", "quantum", "lantern", "giraffe", "saxophone", "umbrella"]
    chats = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            turns = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")]
        elif kind == 1:
            lo = rng.randint(1, 50)
            hi = lo + rng.randint(3, 40)
            turns = [(f"List the numbers from {lo} to {hi}.", ", ".join(str(k) for k in range(lo, hi + 1)) + ".")]
        elif kind == 2:
            w = rng.choice(words)
            turns = [(f"Spell the word '{w}' letter by letter.", "-".join(w.upper()))]
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            turns = [(f"What is {a} times {b}?", f"{a} times {b} is {a * b}."),
                     ("And twice that?", f"Twice {a * b} is {2 * a * b}.")]  # fmt: skip
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        for q, r in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        chats.append({"messages": messages})
    return chats


# ---- models --------------------------------------------------------------------------------------------
def tiny_model():
    """A random Llama-family model (SmolLM2's shape, scaled down) with a small trained chat tokenizer."""
    from nanoseek.model.dense import DenseConfig, DenseForCausalLM
    from nanoseek.train.tokenizer import train_tokenizer

    texts = [m["content"] for c in generated_chats(400, seed=1) for m in c["messages"]]
    tok = train_tokenizer(texts, vocab_size=512)
    cfg = DenseConfig(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DenseForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    return model, tok, "tiny random Llama"


def load_model(name: str):
    import nanoseek
    from nanoseek.assets import resolve_model

    if name == "tiny":
        return tiny_model()
    path = resolve_model(name)
    return nanoseek.load(path, dtype="float32"), nanoseek.load_tokenizer(path), f"{name} ({Path(path).name})"


def padded_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded to the longest conversation: the usual HF recipe."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.where(torch.tensor(e.assistant), torch.tensor(e.ids), -100)
    return ids, mask, labels


# ---- the benchmark -----------------------------------------------------------------------------------------
def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments both SFT benchmarks take (this one and bench/sft_lora.py's LoRA vs full SFT)."""
    ap.add_argument("--model", default="smollm2", help="smollm2 (default, from PyPI), tiny (random), or a path")
    ap.add_argument("--batch", type=int, default=8, help="conversations per optimizer step (default 8)")
    ap.add_argument("--conversations", type=int, default=64, help="size of the generated chat data set")
    ap.add_argument("--reps", type=int, default=6, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    ap.add_argument(
        "--clock", choices=["cpu", "wall"], default="cpu",
        help="cpu: this process's CPU seconds (robust to other load when single-threaded); wall: elapsed time",
    )  # fmt: skip
    ap.add_argument("--plot", help="write a PNG here: the per-round time ratios and each side's conversations/s")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--lora" in argv:  # LoRA SFT vs full SFT: bench/sft_lora.py
        from nanoseek.bench.sft_lora import main as lora_main

        return lora_main([a for a in argv if a != "--lora"])
    ap = argparse.ArgumentParser(prog="nanoseek bench sft", description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--check-steps", type=int, default=3, help="first steps whose losses must agree")
    ap.add_argument("--lr", type=float, default=5e-5, help="constant learning rate of both sides")
    ap.add_argument("--lora", action="store_true", help="instead: LoRA SFT vs full SFT (bench/sft_lora.py)")
    args = ap.parse_args(argv)
    if min(args.batch, args.reps, args.conversations, args.check_steps) < 1:
        raise ValueError("--batch, --reps, --conversations and --check-steps must be >= 1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp()
    try:
        run(args, Path(out))
    finally:  # the caller's thread setting and disk are not ours to keep
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)


def run(args: argparse.Namespace, out: Path) -> None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ValueError("this benchmark needs transformers (pip install -e '.[dev]')") from exc
    from nanoseek.train.sft import prepare_sft
    from nanoseek.weights.hf_folder import save_pretrained

    model, tok, label = load_model(args.model)
    save_pretrained(model, out / "start")  # what the transformers side loads: the same initial weights
    tok.save(out / "start")
    sets = [f"batch_size={args.batch}", f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=1",
            "ckpt_every=0", "max_steps=100000", "log_every=100000", "peak_flops=1e11"]  # fmt: skip
    trainer = prepare_sft(model, generated_chats(args.conversations), out / "run", sets, tokenizer=tok,
                          show_progress=False)  # fmt: skip
    trainer._setup()
    examples, source = trainer.plan.examples, trainer.source
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    hf = AutoModelForCausalLM.from_pretrained(out / "start", dtype=torch.float32, attn_implementation="sdpa").train()
    o = trainer.cfg.optim
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0,
                               foreach=True)  # fmt: skip

    def ours(i: int) -> float:
        return trainer._train_step(i, args.lr)["loss"]

    def plain(i: int) -> float:
        ids, mask, labels = padded_batch([examples[j] for j in source.step_indices(i)], pad_id)
        loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=True)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    # before timing: the first --check-steps steps of both sides, untimed (they are the warm-up too); the
    # benchmark stops here unless their losses agree
    checked = {NANOSEEK: [], PLAIN: []}
    for i in range(args.check_steps):
        checked[NANOSEEK].append(ours(i))
        checked[PLAIN].append(plain(i))
    check_curves(checked[NANOSEEK], checked[PLAIN], args.check_steps)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load_before = os.getloadavg()[0]
    first = args.check_steps  # the timed rounds go on from the checked steps' weights
    times, losses = alternate({NANOSEEK: lambda i: ours(first + i), PLAIN: lambda i: plain(first + i)},
                              rounds=args.reps, warmup=0, clock=clock)  # fmt: skip
    load_after = os.getloadavg()[0]

    steps = args.check_steps + args.reps
    batches = [[examples[j] for j in source.step_indices(i)] for i in range(steps)]
    real = sum(e.length for b in batches for e in b)
    padded = sum(len(b) * max(e.length for e in b) for b in batches)
    packed = sum(source.batches(i)[0][0].numel() for i in range(steps))
    n_params = sum(p.numel() for p in {id(p): p for p in trainer.model.parameters()}.values())
    print(
        f"{label}: {n_params / 1e6:.1f}M params; {len(examples)} generated chats, {args.batch} per step, "
        f"{real / (steps * args.batch):.0f} tokens each on average; {torch.get_num_threads()} thread(s), "
        f"{args.clock} clock, torch {torch.__version__}; {args.reps} alternating rounds after 1 warm-up; "
        f"load average {load_before:.1f} -> {load_after:.1f} (shared machine)"
    )
    print(
        f"token positions per step: padded batch {padded / steps:.0f}, packed rows {packed / steps:.0f}, "
        f"real {real / steps:.0f}; assistant tokens are {100 * trainer_targets(batches) / real:.0f}% of them"
    )
    curve = " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(checked[NANOSEEK], checked[PLAIN]))
    print(f"loss curves agree, checked before timing (nanoseek/transformers, steps 0-{args.check_steps - 1}): {curve}")
    curve = " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(losses[NANOSEEK], losses[PLAIN]))
    print(f"timed steps' losses (nanoseek/transformers): {curve}")
    rows = []
    for name, ts in times.items():
        spread = Spread.of(ts)
        rows.append([name, f"{spread.median:.2f}", f"{spread.lo:.2f}–{spread.hi:.2f}",
                     f"{args.batch / spread.median:.2f}"])  # fmt: skip
    print(table(["SFT step", "median (s)", "min–max (s)", "conversations/s"], rows))
    speedup = paired_ratio(times, PLAIN, NANOSEEK)
    print(f"\nconversations/s, nanoseek / transformers loop (per-round time ratio): {speedup.format(unit='×')}")
    if args.plot:
        plot(
            args, f"SFT: nanoseek / transformers loop, {label}", times, PLAIN, NANOSEEK, f"{n_params / 1e6:.1f}M params"
        )


def plot(args, title: str, times: dict[str, list[float]], slower: str, faster: str, note: str = "") -> None:
    """Both SFT benchmarks' --plot: per round, time[slower] / time[faster] (the conversations/s ratio of `faster`
    over `slower`), and each side's conversations/s."""
    from nanoseek.bench.plots import machine_note, ratio_plot, round_ratios

    clock = "process CPU clock" if args.clock == "cpu" else "wall clock"
    short = {name: name.split(" (")[0] for name in times}
    ratio_plot(args.plot, title, {f"{short[faster]} / {short[slower]}": round_ratios(times, slower, faster)},
               ylabel="conversations/s ratio (per round)",
               absolute={short[name]: [args.batch / t for t in ts] for name, ts in times.items()},
               absolute_ylabel="conversations/s",
               footnote=f"{machine_note(torch.get_num_threads(), clock)}; {args.batch} conversations a step, "
                        f"{args.reps} rounds" + (f"; {note}" if note else ""))  # fmt: skip
    print(f"plot: {args.plot}")


def trainer_targets(batches) -> int:
    return sum(e.n_targets for b in batches for e in b)


def check_curves(ours: list[float], theirs: list[float], n: int) -> None:
    """Raise unless step 0 agrees within LOSS_RTOL and the first n steps within CURVE_RTOL."""
    for i, (a, b) in enumerate(zip(ours[:n], theirs[:n])):
        limit = LOSS_RTOL if i == 0 else CURVE_RTOL
        if relative_gap(a, b) > limit:
            raise OutputsDisagree(
                f"step {i}: nanoseek loss {a:.6g} vs transformers {b:.6g} (relative gap {relative_gap(a, b):.1e} > "
                f"{limit:g}): the sides would not time the same training"
            )


if __name__ == "__main__":
    main()
