"""Greedy decoding the slow, obvious way: a full forward over the whole sequence for every new token, no
cache, no batching. The reference the engine's fast paths (paged cache, batching, chunked prefill,
speculation) must reproduce token for token."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


@torch.no_grad()
def greedy_reference(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = ()) -> list[int]:
    stop = set(stop_ids)
    ids = list(prompt)
    out: list[int] = []
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        if len(ids) >= limit:
            break
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


@torch.no_grad()
def paged_forward_in_chunks(model, ids: torch.Tensor, chunks: Sequence[int], block_size: int = 4) -> torch.Tensor:
    """Logits [B, T, V] of `ids` [B, T] fed through the engine's paged cache a chunk at a time (e.g. a prefill
    of 8, then one token per forward): what a cached decode computes, for comparison with one full forward."""
    from nanoseek.engine.kv_cache import BlockPool, KVLayout, PagedStorage
    from nanoseek.engine.kv_groups import SequenceBlocks
    from nanoseek.engine.runner import cache_layout

    B, T = ids.shape
    assert sum(chunks) == T
    spec, windows = cache_layout(model)
    layout = KVLayout.of(windows)
    pool = BlockPool(B * layout.num_groups * -(-T // block_size) + 1, block_size)
    storage = PagedStorage(spec, pool, torch.float32, "cpu", layout)
    seqs = [SequenceBlocks(pool, layout) for _ in range(B)]
    for seq in seqs:
        assert seq.reserve(T, 0)
    out, start = [], 0
    for n in chunks:
        view = storage.view(seqs, [start] * B, [n] * B)
        out.append(model(ids[:, start : start + n], cache=view))
        start += n
    return torch.cat(out, dim=1)
