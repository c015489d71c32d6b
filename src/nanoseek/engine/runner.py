"""One batched forward over the paged cache: rows of new tokens in, each row's next-token logits out.

The model sees a right-padded [B, T] batch, the positions of its new tokens and a `PagedView`, and returns
logits only at each row's last new token (a prefill chunk of 500 tokens needs one row of logits, not 500),
or at its last few when it verifies speculative drafts.
It works for every nanoseek model: the dense families cache k and v per layer, DeepSeek-V3 caches MLA's
compressed c_kv and k_pe (kv_lora_rank + qk_rope_head_dim values per token and layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.engine.kv_cache import BlockPool, BlockTable, CacheSpec, PagedStorage, PagedView


@dataclass
class Row:
    table: BlockTable
    past_len: int  # tokens already in the cache
    token_ids: Sequence[int]  # the new tokens, at positions past_len..
    num_logits: int = 1  # logits wanted at this many last new tokens (1 + drafts when verifying)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [B, n, V] fp32, right-aligned: row i's num_logits are logits[i, n - num_logits:]
    hidden: torch.Tensor | None  # [B, T, d] final-normed hidden states of every new token (when asked)
    view: PagedView  # the cache view it ran with (MTP drafting runs its own layer over the same positions)
    past_lens: list[int]  # each row's first new position

    def row_logits(self, i: int, num_logits: int) -> torch.Tensor:
        """Row i's logits at its last num_logits new tokens: [num_logits, V]."""
        return self.logits[i, self.logits.shape[1] - num_logits :]


def cache_layout(model, *, mtp: bool = False) -> tuple[CacheSpec, list[int | None]]:
    """What the model caches per token and layer, and each layer's attention window (None: full).
    mtp: DeepSeek's MTP modules get cache layers too, after the main ones (their blocks' layer_idx is
    num_hidden_layers + k), for MTP drafting."""
    cfg = model.config
    if hasattr(cfg, "kv_lora_rank"):  # DeepSeek-V3 / V2: MLA's latent cache
        layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
        spec = CacheSpec(layers, {"c_kv": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)})
        return spec, [None] * cfg.num_hidden_layers
    kv = (cfg.num_key_value_heads, cfg.head_dim)
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in cfg.layer_types]
    return CacheSpec(cfg.num_hidden_layers, {"k": kv, "v": kv}), windows


class ModelRunner:
    def __init__(self, model, pool: BlockPool, autocast_dtype: torch.dtype | None = None, *, mtp: bool = False):
        self.model = model.eval()  # eval: the router's balancing statistics never move at inference
        weight = next(model.parameters())  # the embedding (linears may be quantized modules without .weight)
        self.device = weight.device
        self.autocast_dtype = autocast_dtype
        self.spec, self.layer_windows = cache_layout(model, mtp=mtp)
        self.windows = sorted(set(self.layer_windows), key=lambda w: -1 if w is None else w)
        self.storage = PagedStorage(self.spec, pool, weight.dtype, self.device)
        # compute the forwards whose rows are all decodes or verifications (logits at every new token) query by
        # query (PagedView.query_spans); the engine turns it on for speculative decoding
        self.row_wise = False

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def all_sliding(self) -> int | None:
        """The window when every layer slides (its blocks can be freed as they fall out), else None."""
        w = self.layer_windows
        return w[0] if w and None not in w and len(set(w)) == 1 else None

    @torch.inference_mode()
    def forward(self, rows: Sequence[Row], *, hidden: bool = False) -> ForwardResult:
        """Logits (fp32) at each row's last `num_logits` new tokens; hidden: also every new token's final-normed
        hidden state (DeepSeek models only: MTP drafting needs it)."""
        new_lens = [len(r.token_ids) for r in rows]
        T = max(new_lens)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : new_lens[i]] = torch.as_tensor(list(r.token_ids), dtype=torch.long)
        row_wise = self.row_wise and all(r.num_logits == n for r, n in zip(rows, new_lens))
        view = self.storage.view(
            [r.table for r in rows], [r.past_len for r in rows], new_lens, self.windows, row_wise=row_wise
        )
        n = max(r.num_logits for r in rows)
        # row i's last n positions (clamped at 0: a row with fewer wanted repeats its first, then ignores it)
        index = (torch.tensor(new_lens)[:, None] - n + torch.arange(n)[None, :]).clamp(min=0).to(self.device)
        ids = ids.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):  # fmt: skip
            if hidden:
                logits, h = self.model(ids, cache=view, logits_index=index, return_hidden=True)
            else:
                logits, h = self.model(ids, cache=view, logits_index=index), None
        return ForwardResult(logits.float(), h, view, [r.past_len for r in rows])
