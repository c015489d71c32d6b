"""Attention that reads the paged KV cache in place (native/csrc/paged_attention.cpp), for every forward of a dense
model on CPU: decode steps, speculative verifications and prompt chunks.

The unfused decode step gathers every row's keys and values out of the cache in every layer ([B, S, K, D]
copies) and runs SDPA over them, one small matrix-vector product per head: on SmolLM2's shapes (9 heads, 3 KV
heads of 64, 30 layers, 2 threads) that took 1.79 ms a token at 264 keys, the kernel 0.34 ms (5.2x; 4.2-6.6x
from 1 to 64 rows, `benchmarks/paged_attention.py`). Eager SmolLM2 int4 decoding got 1.25x faster; compiled
decoding, whose inductor kernels already fused the gathers, about the same (1.01x, in-process A/B).
The kernel also computes each query from exactly the keys its mask allows, in key order, in one fixed sequence
of operations, so a query's numbers (bit for bit) depend neither on the rows it is batched with nor on where
its prompt chunk starts: with int8 activations (the int4 and int8 run formats) SDPA's last-bit differences
between chunkings turned into different tokens (issue 23: SmolLM2 Q4_1's answer changed with chunks starting
at 82, 208, 221 or 240 tokens; tests/test_batch_invariance.py).

Prompt chunks used to run SDPA, whose blocked matmuls are fast over many queries; the kernel keeps up by
tiling a chunk's queries (8 at a time) and a GQA group's heads over shared key blocks read from L1. One
thread, SmolLM2's attention (9 heads, 3 KV heads of 64) for a 256-token chunk: 0.7-1.0x SDPA's time from the
start of a prompt, 1.5-2x with 350-1,000 keys before it; a whole SmolLM2 int4 chunk forward 0.85x at the
start, 1.13-1.2x after 744 tokens (in-process A/B, medians; decode steps 0.95-1.0x the previous kernel).

Used by dense models with fp32 weights on CPU (their caches fp32 or fp16: runner.kv_cache_dtype), without logit
soft-capping (Gemma 2 keeps its explicit path, and DeepSeek's MLA its own). Where the kernel cannot be built,
everything keeps SDPA.
"""

from __future__ import annotations

import torch

from nanoseek import native

# AVX2 + FMA, and F16C to read fp16 caches: every x86-64 CPU this runs on has them, and the build is cached per
# source, not per CPU. No -ffast-math and -ffp-contract=off: the compiler must not reorder or fuse the kernel's
# arithmetic, whose fixed order is what makes a query's result independent of its batch and of its prompt chunk
FLAGS = ("-mavx2", "-mfma", "-mf16c", "-ffp-contract=off")
KERNEL = native.Kernel("paged_attention.cpp", "the paged attention kernel", FLAGS)
unavailable_reason, available = KERNEL.unavailable_reason, KERNEL.available


def paged_attention(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [N, H, D] over the keys slots [N, S] of k_store/v_store [slots, K, D] that mask [N, S] allows -> [N, H, D]."""
    return torch.ops.nanoseek.paged_attention(q, k_store, v_store, slots, mask, scale)
