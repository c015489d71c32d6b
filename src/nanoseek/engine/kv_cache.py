"""The paged KV cache: fixed-size blocks shared by all sequences, block tables, prefix caching.

    pool = BlockPool(num_blocks=256, block_size=16)
    table = BlockTable(pool)                 # one per sequence
    table.reserve(n_tokens)                  # blocks for the positions it will hold (False: pool is full)
    storage = PagedStorage(spec, pool, dtype, device)   # the tensors, one flat slot axis per layer
    view = storage.view(tables, past_lens, new_lens)    # what one batched forward reads and writes

Every token has a *slot*: `block * block_size + offset`. The storage keeps, per layer and per cached tensor
(k and v for the dense families; MLA's compressed c_kv and k_pe for DeepSeek), one tensor
`[num_blocks * block_size, *per_token_shape]`. A forward gets a `PagedView`: the slots where its new
tokens go, the slots every row reads (its whole history in order), and the attention masks, all built once
per step and shared by every layer. Slot 0 (block 0) is never handed out: rows shorter than the longest
read it as padding, and the masks hide it.

Prefix caching: a *full* block is identified by the hash of its tokens chained with its predecessor's
hash, so two sequences that start with the same tokens (a shared system prompt, few-shot examples) share
the blocks of that prefix and prefill it once. Freed blocks keep their contents and hash until the pool
needs them again (least recently freed first), so a prefix stays reusable across requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NULL_BLOCK = 0  # never allocated: padding slots point here


class BlockPool:
    """Block ids 1..num_blocks-1 with reference counts, a free queue and a prefix-hash index."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        # Free blocks in the order they were freed (oldest first); cached ones may be revived by a hit.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._hash_of: dict[int, int] = {}  # block -> prefix hash of its (full) contents
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self.hits = self.queries = 0  # prefix-cache statistics (blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks held by live sequences."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def allocate(self) -> int | None:
        """A fresh block (ref count 1), evicting the least recently freed cached block; None when full."""
        if not self._free:
            return None
        block, _ = self._free.popitem(last=False)
        old = self._hash_of.pop(block, None)
        if old is not None:
            del self._block_of[old]
        self.ref_count[block] = 1
        return block

    def release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        if self.ref_count[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self._free[block] = None

    def lookup(self, prefix_hash: int) -> int | None:
        """The cached block holding exactly this prefix, now shared (ref count + 1); None on a miss."""
        self.queries += 1
        block = self._block_of.get(prefix_hash)
        if block is None:
            return None
        self.hits += 1
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1
        return block

    def register(self, block: int, prefix_hash: int) -> None:
        """Mark a full block as holding `prefix_hash`'s tokens, so later sequences can share it."""
        if prefix_hash in self._block_of or block in self._hash_of:
            return  # the same prefix computed twice concurrently: keep the first copy
        self._hash_of[block] = prefix_hash
        self._block_of[prefix_hash] = block


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockTable:
    """One sequence's blocks, in position order. Position p lives in blocks[p // block_size]."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # prefix hashes of the leading full blocks registered so far
        self.num_freed = 0  # leading blocks given back because they fell out of a sliding window

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def match_prefix(self, tokens: Sequence[int]) -> int:
        """Share cached blocks for the longest cached prefix of `tokens` (whole blocks only, and never the
        whole prompt: the last token must be computed to get logits). Returns the tokens covered."""
        if self.blocks:
            raise RuntimeError("match_prefix must come before any block is reserved")
        bs = self.pool.block_size
        parent = None
        for start in range(0, len(tokens) - 1 - (len(tokens) - 1) % bs, bs):
            h = chain_hash(parent, tokens[start : start + bs])
            block = self.pool.lookup(h)
            if block is None:
                break
            self.blocks.append(block)
            self.hashes.append(h)
            parent = h
        return len(self.blocks) * bs

    def reserve(self, num_tokens: int) -> bool:
        """Make room for positions 0..num_tokens-1. False (and nothing taken) when the pool is short."""
        need = -(-num_tokens // self.pool.block_size) - len(self.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        self.blocks.extend(self.pool.allocate() for _ in range(need))
        return True

    def register_full_blocks(self, tokens: Sequence[int], num_computed: int) -> None:
        """Index every block whose tokens are all computed (positions < num_computed) for prefix reuse."""
        bs = self.pool.block_size
        while len(self.hashes) < min(num_computed // bs, len(self.blocks)):
            i = len(self.hashes)
            h = chain_hash(self.hashes[-1] if self.hashes else None, tokens[i * bs : (i + 1) * bs])
            if self.blocks[i] != NULL_BLOCK:
                self.pool.register(self.blocks[i], h)
            self.hashes.append(h)

    def free_before(self, position: int) -> None:
        """Give back the blocks that only hold positions < `position` (out of every layer's window)."""
        while self.num_freed < min(position // self.pool.block_size, len(self.blocks)):
            self.pool.release(self.blocks[self.num_freed])
            self.blocks[self.num_freed] = NULL_BLOCK
            self.num_freed += 1

    def release(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.hashes, self.num_freed = [], [], 0


@dataclass(frozen=True)
class CacheSpec:
    """What the cache holds per token and layer: name -> shape (k/v [K, D] for dense; c_kv [r], k_pe [dr])."""

    num_layers: int
    per_token: dict[str, tuple[int, ...]]

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * sum(int(torch.tensor(s).prod()) if s else 1 for s in self.per_token.values()) * size


class PagedStorage:
    """The cache tensors: per name, one [num_blocks * block_size, *per_token_shape] tensor per layer.
    Separate tensors per layer (not one stacked [num_layers, ...] tensor) so that a compiled decode step
    writes a layer's new slots in place: torch.compile copies a whole input when a *view* of it is
    mutated (measured: every layer's write copied the entire stacked cache, 3x slower than eager)."""

    def __init__(self, spec: CacheSpec, pool: BlockPool, dtype: torch.dtype, device: torch.device | str):
        self.spec, self.pool = spec, pool
        slots = pool.num_blocks * pool.block_size
        self.tensors = {
            name: [torch.zeros(slots, *shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]
            for name, shape in spec.per_token.items()
        }

    def view(
        self,
        tables: Sequence[BlockTable],
        past_lens: Sequence[int],
        new_lens: Sequence[int],
        windows: Sequence[int | None] = (None,),
        *,
        row_wise: bool = False,
    ) -> PagedView:
        """The view for one forward of len(tables) rows: row i holds new_lens[i] new tokens at positions
        past_lens[i].., right-padded to the longest; `windows` lists the sliding windows whose masks the
        model will ask for (None: full attention); row_wise: the models compute each query as if alone
        (PagedView.query_spans)."""
        device = next(iter(self.tensors.values()))[0].device
        bs = self.pool.block_size
        B, T = len(tables), max(new_lens)
        S = max(p + n for p, n in zip(past_lens, new_lens))
        block_ids = torch.zeros(B, -(-S // bs), dtype=torch.long)
        for i, table in enumerate(tables):
            block_ids[i, : len(table.blocks)] = torch.tensor(table.blocks[: block_ids.shape[1]], dtype=torch.long)
        key_pos = torch.arange(S)
        read_slots = block_ids[:, key_pos // bs] * bs + key_pos % bs  # [B, S]
        past = torch.tensor(past_lens)[:, None]
        new = torch.tensor(new_lens)[:, None]
        query_pos = past + torch.arange(T)[None, :]  # [B, T]
        query_real = torch.arange(T)[None, :] < new
        write_slots = torch.gather(read_slots, 1, query_pos.clamp(max=S - 1))
        write_slots = torch.where(query_real, write_slots, NULL_BLOCK)  # padding queries write into block 0
        masks = {w: _mask(query_pos, past + new, S, w) for w in windows}
        spans = None
        if row_wise:
            spans = [(i, t, p + t + 1) for i, (p, n) in enumerate(zip(past_lens, new_lens)) for t in range(n)]
        return PagedView(
            self.tensors,
            read_slots.to(device),
            write_slots.to(device),
            query_pos.to(device),
            {w: m.to(device) for w, m in masks.items()},
            spans,
        )


def _mask(query_pos: torch.Tensor, seq_lens: torch.Tensor, S: int, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] bool: a query sees its row's keys at positions <= its own (and > its own - window).
    A padding query (beyond its row's length) sees key 0 only, so its softmax is never empty."""
    key = torch.arange(S)[None, None, :]
    q = query_pos[:, :, None]
    allowed = (key <= q) & (key < seq_lens[:, :, None])
    if window is not None:
        allowed &= key > q - window
    allowed |= (key == 0) & ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


@dataclass
class PagedView:
    """One forward's window onto the paged cache. Models call `update` once per layer, then attend with
    `mask(window)`; `positions` are the new tokens' positions (for rotary embeddings)."""

    tensors: dict[str, list[torch.Tensor]]  # name -> per-layer [slots, *shape]
    read_slots: torch.Tensor  # [B, S]
    write_slots: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, T, S] bool
    # Row-wise forwards (speculative decoding's decodes and verifications): (row, query index, key count) of
    # every real query. The models then compute attention one query at a time over exactly its own keys,
    # unmasked, and DeepSeek's MoE one token at a time, so a query's numbers are the same whatever else is in
    # the forward: alone, beside longer rows, or as position j of a verification (T = 1 + drafts). Batched,
    # they are not: on CPU, SDPA's result for a row moves by ~1e-7 with the number of query rows (its
    # matmuls change shape) and with the key padding (its reductions change blocking), and so do fp32 matmuls
    # (MLA's absorbed kv_b_proj, the router, the experts) with their row count; int8's activation rounding can
    # turn that into a different token. None: attend with the masks, all rows at once.
    query_spans: list[tuple[int, int, int]] | None = None
    is_paged = True  # what the models look for (model/ does not import the engine)

    def update(self, layer: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store each new tensor [B, T, *shape] at the write slots; return the rows' histories [B, S, *shape]
        in the order the keywords were given."""
        out = []
        flat_write = self.write_slots.reshape(-1)
        for name, value in new.items():
            store = self.tensors[name][layer]
            store.index_copy_(0, flat_write, value.reshape(-1, *store.shape[1:]).to(store.dtype))
            out.append(store[self.read_slots])
        return tuple(out)

    def mask(self, window: int | None = None) -> torch.Tensor:
        return self.masks[window]
