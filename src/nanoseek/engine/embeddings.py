"""Embeddings of token sequences: mean-pooled final hidden states, L2-normalised.

    vectors = pooled_embeddings(engine.runner, [[1, 2, 3], [4, 5]])   # [2, hidden_size] fp32, each of norm 1
    groups = embedding_batches([len(ids) for ids in inputs], max_tokens=256)   # which inputs share a forward

`Engine.embed` (offline) and `AsyncEngine.embed` (a server: each forward a job on the engine's thread, between
its steps) call these.

An input's vector is the mean, over its tokens, of the model's last hidden states after the final norm (the
states the LM head turns into logits), divided by its L2 norm. Every nanoseek model splits its forward so
(`forward_hidden`), the dense families and DeepSeek-V3 alike, quantized or not.

The forward is the engine's own prompt forward (runner.ModelRunner: its paged view, its attention kernel, its
autocast), one prefill of every input at once, with no decode after it. Its keys and values go to a scratch
cache made for this forward and dropped after it, never to the engine's block pool: running requests' blocks
and the prefix cache are not touched, and a busy server cannot run out of blocks for an embedding. (The
scratch tensors are sized for the forward's tokens and, on the CPU, only the pages written become resident.)

Alone or in a batch: several inputs share one forward, right-padded to the longest; each row's queries see its
own keys only (the view's masks), and the pooling averages its real positions only. Dense models on the CPU
attend in the paged attention kernel, which computes each query from its own keys in one fixed order, so with
quantized weights (int8/int4 linears compute each row on its own) an input's vector is the same bit for bit
alone and in any batch (tests/test_serve_embeddings.py). With fp32 weights MKL's sgemm sums a row in an order
that depends on the number of rows, and DeepSeek's MLA attends through SDPA over the padded key axis: there the
vectors agree to float rounding, within EMBEDDING_TOLERANCE (measured: a few 1e-8 on the tiny test models).
Rows of similar length share a forward (`embedding_batches`, the engine's rule for prompt chunks), so a long
input does not pad every short one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nanoseek.engine.kv_cache import BlockPool, PagedStorage
from nanoseek.engine.kv_groups import SequenceBlocks

# max |a - b| over the components of one input's unit vector alone and in a batch, where they are not bitwise equal
EMBEDDING_TOLERANCE = 1e-6


@torch.inference_mode()
def pooled_embeddings(runner, inputs: Sequence[Sequence[int]], block_size: int = 16) -> torch.Tensor:
    """[len(inputs), hidden_size] fp32 on the CPU: each input's final hidden states (after the final norm),
    averaged over its tokens and L2-normalised, from one forward of `runner` (engine.runner.ModelRunner) over all
    of them. `inputs`: non-empty token-id lists within the model's context (ValueError otherwise)."""
    lengths = [len(ids) for ids in inputs]
    if not inputs or min(lengths) < 1:
        raise ValueError("every input needs at least one token")
    if max(lengths) > runner.context_length:
        raise ValueError(f"an input has {max(lengths)} tokens; the model's context is {runner.context_length}")
    # a scratch cache with exactly the blocks these rows take (block 0 is the pool's reserved null block)
    per_row = [len(runner.layout.windows) * -(-n // block_size) for n in lengths]
    pool = BlockPool(1 + sum(per_row), block_size)
    dtype = next(iter(runner.storage.tensors.values()))[0].dtype  # the engine's cache dtype
    storage = PagedStorage(runner.spec, pool, dtype, runner.device, runner.layout)
    seqs = [SequenceBlocks(pool, runner.layout) for _ in inputs]
    for seq, n in zip(seqs, lengths):
        if not seq.reserve(n, 0):
            raise RuntimeError("the scratch cache is too small")  # a bug in per_row, never the client's input
    view = storage.view(seqs, [0] * len(inputs), lengths)
    view.fused_attention = runner.fused_attention
    view.fused_qkv = runner.fused_qkv
    ids = torch.zeros(len(inputs), max(lengths), dtype=torch.long)
    for i, row in enumerate(inputs):
        ids[i, : lengths[i]] = torch.as_tensor(list(row), dtype=torch.long)
    device, autocast = runner.device, runner.autocast_dtype
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = runner.model.forward_hidden(ids.to(device), cache=view)  # [B, T, d]
    vectors = torch.stack([hidden[i, :n].float().mean(0) for i, n in enumerate(lengths)])
    return F.normalize(vectors, dim=-1).cpu()


def embedding_batches(lengths: Sequence[int], max_tokens: int, max_waste: float = 0.25) -> list[list[int]]:
    """The inputs' indices grouped into forwards: inputs of similar length together, each forward's padded size
    (rows x longest) within `max_tokens` unless one input is longer on its own, and its padding within `max_waste`
    of its real tokens. Groups come shortest first; each lists its inputs in their original order."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        n = lengths[i]  # the longest in the current group: lengths come sorted
        rows = len(groups[-1]) + 1 if groups else 1
        if groups and n * rows <= max_tokens and n * rows <= (1 + max_waste) * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return [sorted(g) for g in groups]


def check_embedding_input(ids: Sequence[int], vocab_size: int, context_length: int) -> list[int]:
    """`ids` as a list of ints, or ValueError naming what is wrong: empty, an id outside the vocabulary, or more
    tokens than the model's context (an embedding needs no room for a reply: the whole context may be used)."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the input is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if len(ids) > context_length:
        raise ValueError(f"the input has {len(ids)} tokens; the model's context is {context_length} tokens")
    return ids


def gather(groups: list[list[int]], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The groups' vectors back in the inputs' order."""
    order = torch.tensor([i for group in groups for i in group])
    out = torch.empty(len(order), parts[0].shape[1])
    out[order] = torch.cat(list(parts))
    return out
