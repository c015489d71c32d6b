"""Decode attention over a paged KV cache on CPU: nanoseek's kernel (engine/paged_attention.py) against what the
engine ran before it, gathering each row's keys and values out of the cache and calling SDPA.

    PYTHONPATH=src python benchmarks/paged_attention.py [--threads 2] [--rounds 9]

Both sides get the same queries, cache, slots and masks (SmolLM2-135M's attention: 9 query heads, 3 KV heads
of 64, 30 layers; rows of random lengths up to S, scattered over 16-slot blocks), and their outputs are
compared first. Rounds alternate the sides; each figure is the median time of 30 layers' attention (one
token) over the rounds, with the spread (min-max), and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.engine import paged_attention

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16
CASES = [(1, 264), (1, 1024), (4, 512), (16, 96), (64, 96)]  # (rows, longest row's keys)


def make_case(rows: int, S: int, gen: torch.Generator):
    slots_total = max(4096, rows * S * 2)
    k_store = torch.randn(slots_total, KV_HEADS, HEAD_DIM, generator=gen)
    v_store = torch.randn(slots_total, KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=gen)
    blocks = torch.stack([torch.randperm(slots_total // BLOCK, generator=gen)[: -(-S // BLOCK)] for _ in range(rows)])
    pos = torch.arange(S)
    slots = blocks[:, pos // BLOCK] * BLOCK + pos % BLOCK
    lens = torch.randint(S // 2, S + 1, (rows,), generator=gen)
    lens[0] = S
    mask = pos[None] < lens[:, None]
    return q, k_store, v_store, slots, mask


def gather_sdpa(q, k_store, v_store, slots, mask, scale):
    k, v = k_store[slots].transpose(1, 2), v_store[slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)  # fmt: skip
    return out[:, :, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if reason := paged_attention.unavailable_reason():
        raise SystemExit(f"the kernel cannot run here: {reason}")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    scale = HEAD_DIM**-0.5
    sides = {"gather + SDPA": gather_sdpa, "paged kernel": paged_attention.paged_attention}
    print(f"{args.threads} threads, {args.rounds} alternating rounds; ms per token ({LAYERS} layers), median (min-max)")
    print("| rows | keys | gather + SDPA | paged kernel | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for rows, S in CASES:
        case = make_case(rows, S, gen)
        outs = {name: fn(*case, scale) for name, fn in sides.items()}
        diff = (outs["gather + SDPA"] - outs["paged kernel"]).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f"the sides disagree: max abs diff {diff:.2e}")
        times = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                for _ in range(LAYERS):
                    fn(*case, scale)
                times[name].append((time.perf_counter() - t0) * 1000)
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = [f"{med[n]:.3f} ({min(t):.3f}-{max(t):.3f})" for n, t in times.items()]
        ratio = med["gather + SDPA"] / med["paged kernel"]
        print(f"| {rows} | {S} | {cells[0]} | {cells[1]} | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
