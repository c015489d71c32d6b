"""One batched forward over the paged cache: rows of new tokens in, each row's next-token logits out.

The model sees a right-padded [B, T] batch, the positions of its new tokens and a `PagedView`, and returns
logits only at each row's last new token (a prefill chunk of 500 tokens needs one row of logits, not 500).
It works for every nanoseek model: the dense families cache k and v per layer, DeepSeek-V3 caches MLA's
compressed c_kv and k_pe (kv_lora_rank + qk_rope_head_dim values per token and layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.engine.kv_cache import BlockPool, BlockTable, CacheSpec, PagedStorage


@dataclass
class Row:
    table: BlockTable
    past_len: int  # tokens already in the cache
    token_ids: Sequence[int]  # the new tokens, at positions past_len..


def cache_layout(model) -> tuple[CacheSpec, list[int | None]]:
    """What the model caches per token and layer, and each layer's attention window (None: full)."""
    cfg = model.config
    if hasattr(cfg, "kv_lora_rank"):  # DeepSeek-V3 / V2: MLA's latent cache
        spec = CacheSpec(cfg.num_hidden_layers, {"c_kv": (cfg.kv_lora_rank,), "k_pe": (cfg.qk_rope_head_dim,)})
        return spec, [None] * cfg.num_hidden_layers
    kv = (cfg.num_key_value_heads, cfg.head_dim)
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in cfg.layer_types]
    return CacheSpec(cfg.num_hidden_layers, {"k": kv, "v": kv}), windows


class ModelRunner:
    def __init__(self, model, pool: BlockPool, autocast_dtype: torch.dtype | None = None):
        self.model = model.eval()  # eval: the router's balancing statistics never move at inference
        weight = next(model.parameters())  # the embedding (linears may be quantized modules without .weight)
        self.device = weight.device
        self.autocast_dtype = autocast_dtype
        self.spec, self.layer_windows = cache_layout(model)
        self.windows = sorted(set(self.layer_windows), key=lambda w: -1 if w is None else w)
        self.storage = PagedStorage(self.spec, pool, weight.dtype, self.device)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def all_sliding(self) -> int | None:
        """The window when every layer slides (its blocks can be freed as they fall out), else None."""
        w = self.layer_windows
        return w[0] if w and None not in w and len(set(w)) == 1 else None

    @torch.inference_mode()
    def forward(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits [B, V] (fp32) at each row's last new token."""
        new_lens = [len(r.token_ids) for r in rows]
        T = max(new_lens)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : new_lens[i]] = torch.as_tensor(list(r.token_ids), dtype=torch.long)
        view = self.storage.view([r.table for r in rows], [r.past_len for r in rows], new_lens, self.windows)
        last = torch.tensor(new_lens, device=self.device) - 1
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):  # fmt: skip
            return self.model(ids.to(self.device), cache=view, logits_index=last).float()
