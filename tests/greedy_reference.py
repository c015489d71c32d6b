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
