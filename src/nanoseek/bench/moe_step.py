"""One MoE training step (forward + backward) of a ~20M-param DeepSeek-V3 config: nanoseek vs
transformers' DeepseekV3ForCausalLM (its default experts implementation, plus "grouped_mm" and "eager"),
same weights, same batch, timed alternately in one run on this machine.

    nanoseek bench moe-step [--batch 8 --seq 256 --reps 7 --threads N]   (or python benchmarks/moe_step.py)

Prints the median step time of each and the speed-up of nanoseek's faster experts backend over
each peer. Noisy machines: compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


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


def step_hf(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    return loss


def step_ours(backend: str):
    from nanoseek.model import moe

    def step(model, x, y):
        previous, moe.EXPERTS_BACKEND = moe.EXPERTS_BACKEND, backend
        try:
            out = model.compute_loss(x, y, mtp_weight=0.0)
            out.loss.backward()
        finally:  # the process-wide choice goes back to what it was
            moe.EXPERTS_BACKEND = previous
        return out.loss

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek bench moe-step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--config", default="bench-20m", help="named model size (see nanoseek.config)")
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import nanoseek
    from nanoseek.config import from_name

    cfg = from_name(args.config)
    peers = {}
    ref, default_impl = build(cfg, None)
    peers[f"transformers default ({default_impl})"] = ref
    peers["transformers grouped_mm"] = build(cfg, "grouped_mm")[0]
    peers["transformers eager experts"] = build(cfg, "eager")[0]
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = nanoseek.load(tmp).train()  # identical weights, so identical routing work
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    with torch.no_grad():  # sanity: same function before timing it
        diff = (ours(x[:1, :64]) - ref(x[:1, :64]).logits).abs().max().item()
    contenders = {
        "nanoseek (grouped_mm)": (ours, step_ours("grouped_mm")),
        "nanoseek (padded_bmm)": (ours, step_ours("padded_bmm")),
        **{k: (m, step_hf) for k, m in peers.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for rep in range(args.reps + 1):  # first round is warm-up
        for name, (model, step) in contenders.items():
            model.zero_grad(set_to_none=True)
            t0 = clock()
            step(model, x, y)
            dt = clock() - t0
            if rep:
                times[name].append(dt)

    n_params = sum(p.numel() for p in ours.parameters())
    tokens = args.batch * args.seq
    print(
        f"config {args.config}: {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq} = {tokens} tokens, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}; "
        f"max |logit diff| vs HF {diff:.1e}"
    )
    ours_t = min(statistics.median(times[k]) for k in times if k.startswith("nanoseek"))
    print(f"{'implementation':38s} {'median step':>12s} {'tokens/s':>10s} {'best nanoseek speed-up':>23s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:38s} {med * 1000:10.1f}ms {tokens / med:10.0f} {med / ours_t:22.2f}x")


if __name__ == "__main__":
    main()
