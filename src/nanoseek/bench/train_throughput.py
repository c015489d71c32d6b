"""Training throughput: nanoseek's training step vs a transformers DeepseekV3ForCausalLM training loop, on
the speedrun's model config (the `tiny` preset), same weights, same batch, same optimizer (AdamW, foreach),
timed alternately in one run on this machine.

    nanoseek bench train-throughput [--batch 256 --seq 12 --reps 20 --threads N]
    (or python benchmarks/train_throughput.py)

Two comparisons, both without MTP (transformers does not train MTP heads; nanoseek's step with MTP is
printed for reference):
- the model step on one identical [batch, seq] tensor: forward + loss + backward + AdamW step (+ nanoseek's
  router-bias update, which transformers' loop lacks);
- the whole training loop on the speedrun's own batches ([batch, 32] rows, one task example each, loss on
  the answer): nanoseek's Trainer step vs a plain transformers loop (forward, masked loss, backward,
  clipping, AdamW). nanoseek's loop cuts the padding all rows share, which is exact under causal attention.
Prints the median step times and both ratios. On a noisy machine compare the ratios, not the absolute
numbers; on a shared 2-core box use --threads 1 (spinning OpenMP threads make 2-thread timings erratic).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def hf_model(cfg):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = cfg.to_dict()
    d.pop("architectures", None)
    d.pop("model_type", None)
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config(**d, attn_implementation="sdpa")).float().train()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek bench train-throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=12, help="the speedrun's rows are ~12 tokens (one add2 problem)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default, erratic when busy)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import nanoseek
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.model.moe import update_router_bias
    from nanoseek.train.config import load_train_config

    cfg = load_train_config(preset="tiny").model_config(vocab_size=512).replace(num_nextn_predict_layers=0)
    ref = hf_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = nanoseek.load(tmp).train()  # identical weights: identical routing work at the start
    torch.manual_seed(0)
    ours_mtp = DeepseekV3ForCausalLM(cfg.replace(num_nextn_predict_layers=1)).train()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        diff = (ours(x[:2]) - ref(x[:2]).logits).abs().max().item()

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def ours_step(model, opt, mtp_weight):
        def step():
            model.compute_loss(x, y, mtp_weight=mtp_weight).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_router_bias(model, gamma=1e-3)

        return step

    def hf_step(model, opt):
        def step():
            logits = model(input_ids=x).logits
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    contenders = {
        "nanoseek": ours_step(ours, adamw(ours), 0.0),
        "transformers": hf_step(ref, adamw(ref)),
        "nanoseek + MTP (reference)": ours_step(ours_mtp, adamw(ours_mtp), 0.3),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for rep in range(args.reps + 2):  # two warm-up rounds
        for name, step in contenders.items():
            t0 = time.perf_counter()
            step()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)

    loop_ratio = full_loops(args)
    tokens = args.batch * args.seq
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"tiny preset config: {n_params / 1e6:.2f}M params (no MTP), batch {args.batch}x{args.seq} = {tokens} tokens, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; max |logit diff| vs HF {diff:.1e}"
    )
    print(f"{'training loop':30s} {'median step':>12s} {'tokens/s':>10s}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, m in med.items():
        print(f"{name:30s} {m * 1000:10.1f}ms {tokens / m:10.0f}")
    print(
        "nanoseek / transformers tokens/s ratio (model step, same tensor): "
        f"{med['transformers'] / med['nanoseek']:.2f}x"
    )
    print(f"nanoseek / transformers ratio (whole training loop on the speedrun's batches): {loop_ratio:.2f}x")


def full_loops(args) -> float:
    """The speedrun's data as TaskBatcher makes it ([batch, 32] rows of one add2/sort problem each, loss on
    the answer): nanoseek's Trainer step (which cuts the padding all rows share, exact under causal attention,
    and clips, updates router biases, reduces logs) vs a plain transformers loop on the same batches
    (forward, masked cross-entropy, backward, clipping, AdamW). Prints and returns the ratio of rows/s."""
    import shutil

    from nanoseek.train.config import load_train_config
    from nanoseek.train.trainer import Trainer

    out = tempfile.mkdtemp()
    cfg = load_train_config(
        preset="tiny",
        overrides=[f"out_dir={out}", f"batch_size={args.batch}", "model.num_nextn_predict_layers=0",
                   "data.tasks=[add2,sort]", "data.task_weights=[0.75,0.25]", "time_budget_min=null"],
    )  # fmt: skip
    trainer = Trainer(cfg, show_progress=False)
    trainer._setup()
    ref = hf_model(trainer.model.config)
    ref.load_state_dict(_hf_state(trainer.model), strict=False)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=True)
    batcher = trainer.source.tasks

    def hf_loop(step):
        x, y = batcher.batch_at(step)
        logits = ref(input_ids=x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"nanoseek Trainer": [], "transformers loop": []}
    for step in range(args.reps + 2):
        for name, fn in (("nanoseek Trainer", lambda s: trainer._train_step(s, 1e-3)), ("transformers loop", hf_loop)):
            t0 = time.perf_counter()
            fn(step)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{'training loop (speedrun batches)':34s} {'median step':>12s} {'rows/s':>10s}   "
        f"[{args.batch} rows of 32 tokens]"
    )
    for name, m in med.items():
        print(f"{name:34s} {m * 1000:10.1f}ms {args.batch / m:10.0f}")
    return med["transformers loop"] / med["nanoseek Trainer"]


def _hf_state(model):
    from nanoseek.weights.deepseek_v3_hf import native_to_hf

    return native_to_hf(model)


if __name__ == "__main__":
    main()
