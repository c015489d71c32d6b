"""Attention masks for packed rows: several documents (conversations) side by side in one row.

A packed row carries `document_ids` [B,T]: the document each position belongs to (0, 1, 2, … within the row)
and -1 for padding after the last document. A query attends to earlier keys of its own document only, so
packing gives the same result as running each document alone, provided positions restart at 0 in each
document (the packer passes such position_ids). This is the block-diagonal causal mask that varlen flash
attention computes without materializing; SDPA takes it as a boolean [B,1,T,T] mask, which works for every
model family here (MLA, GQA, soft-capped attention, sliding windows) on CPU and GPU.
"""

from __future__ import annotations

import torch


def document_causal_mask(document_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Bool [B,1,T,T], True where query t may attend key s: s <= t, same document, and within `window`
    positions when sliding (transformers' rule key > query - window). A padding position (id -1) sees only
    itself, so no softmax is ever empty (its output is never used)."""
    T = document_ids.shape[1]
    q = torch.arange(T, device=document_ids.device)[:, None]
    k = torch.arange(T, device=document_ids.device)[None, :]
    allowed = (k <= q)[None] & (document_ids[:, :, None] == document_ids[:, None, :])
    if window is not None and window < T:
        allowed &= (k > q - window)[None]
    allowed &= (document_ids >= 0)[:, None, :]
    allowed |= (k == q)[None]
    return allowed.unsqueeze(1)


def same_document_ahead(document_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [B,T]: position t and position t+k are real tokens of the same document (MTP depth k's inputs)."""
    ahead = torch.full_like(document_ids, -1)
    if k < document_ids.shape[1]:
        ahead[:, :-k] = document_ids[:, k:]
    return (document_ids >= 0) & (ahead == document_ids)
