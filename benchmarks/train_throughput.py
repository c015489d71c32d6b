"""Training throughput: nanoseek's training step vs a transformers DeepseekV3ForCausalLM training loop, on
the speedrun's model config (the `tiny` preset), same weights, same batch, same optimizer (AdamW, foreach),
timed alternately in one run on this machine.

    python benchmarks/train_throughput.py [--batch 256 --seq 12 --reps 20 --threads N]

A step is forward + loss + backward + AdamW step (+ nanoseek's router-bias update, which transformers'
training loop lacks). The comparison runs without MTP (transformers does not train MTP heads); the step
with MTP is printed for reference. Prints the median tokens/s of each and the ratio. On a noisy machine
compare the ratio, not the absolute numbers.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=12, help="the speedrun's rows are ~12 tokens (one add2 problem)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
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
    print(f"nanoseek / transformers tokens/s ratio: {med['transformers'] / med['nanoseek']:.2f}x")


if __name__ == "__main__":
    main()
