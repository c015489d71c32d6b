"""The paged KV cache: fixed-size blocks shared by all sequences, block tables, prefix caching.

    layout = KVLayout.of(layer_windows)      # which layers share a block table (one group per window kind)
    pool = BlockPool(num_blocks=256, block_size=16)
    blocks = SequenceBlocks(pool, layout)    # one per sequence: a BlockTable per group (engine/kv_groups.py)
    blocks.reserve(n_tokens, num_computed)   # blocks for the positions it will hold (False: pool is full)
    storage = PagedStorage(spec, pool, dtype, device, layout)   # the tensors, one flat slot axis each
    view = storage.view(seqs, past_lens, new_lens)              # what one batched forward reads and writes

Every token has a *slot*: `block * block_size + offset`. The storage keeps, per cached tensor (k and v for
the dense families; MLA's compressed c_kv and k_pe for DeepSeek) and per *storage slot layer*, one tensor
`[num_blocks * block_size, *per_token_shape]`. A forward gets a `PagedView`: the slots where its new
tokens go, the slots every row reads, and the attention masks, all built once per step and shared by
every layer. Slot 0 (block 0) is never handed out: rows shorter than the longest read it as padding, and
the masks hide it.

Layer groups (what vLLM calls the hybrid allocator). Layers with the same attention window form groups of
`num_slots` layers; a sequence holds one block table per group, all drawing from the one pool, and layer
`l` stores its keys/values in tensor `slot(l)` at the blocks of its own group's table. A block id is
owned by one group at a time, so the same tensors serve every group: a block costs `num_slots` layers of
memory whichever group holds it, and the pool never has to be split between groups in advance (a batch of
long sequences takes more full-attention blocks, a batch of short ones fewer). A sliding group's table
gives back the blocks that fell out of its window, so Gemma 3 (5 local : 1 global) keeps its local
layers' cache at about a window per sequence while the global layers keep everything. Models with one
window kind (Llama, Qwen2, Mistral, DeepSeek) have one group of all layers: one table, one tensor per
layer, exactly the plain paged cache. A sliding row reads only the keys its queries can see (from its
first query's window start on), so local layers also attend over a window, not the whole history.

Prefix caching: a *full* block is identified by the hash of its tokens chained with its predecessor's
hash, and by its group (each group's block holds different layers), so two sequences that start with the
same tokens (a shared system prompt, few-shot examples) share the blocks of that prefix and prefill it
once. Freed blocks keep their contents and hash until the pool needs them again (least recently freed
first), so a prefix stays reusable across requests. The rule for hybrid models is in engine/kv_groups.py.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanoseek.engine.fused_ops import rope_store
from nanoseek.engine.paged_attention import paged_attention

if TYPE_CHECKING:
    from nanoseek.engine.kv_groups import SequenceBlocks

NULL_BLOCK = 0  # never allocated: padding slots, and blocks a sliding window no longer needs, point here


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
        self._key_of: dict[int, Hashable] = {}  # block -> (group, prefix hash) of its (full) contents
        self._block_of: dict[Hashable, int] = {}  # (group, prefix hash) -> block
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
        old = self._key_of.pop(block, None)
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

    def cached(self, key: Hashable) -> bool:
        """Whether a block holding exactly this (group, prefix hash) is in the cache (nothing is taken)."""
        return key in self._block_of

    def lookup(self, key: Hashable) -> int | None:
        """The cached block holding exactly this (group, prefix hash), now shared (ref count + 1); None on
        a miss."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self.ref_count[block] == 0:
            del self._free[block]
        self.ref_count[block] += 1
        return block

    def register(self, block: int, key: Hashable) -> None:
        """Mark a full block as holding this (group, prefix hash), so later sequences can share it."""
        if key in self._block_of or block in self._key_of:
            return  # the same prefix computed twice concurrently: keep the first copy
        self._key_of[block] = key
        self._block_of[key] = block


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockTable:
    """One sequence's blocks for one layer group, in position order: position p lives in
    blocks[p // block_size]. A sliding group (window w) needs only the positions a future query can see,
    those >= num_computed - w + 1; the blocks wholly before that are given back and read as NULL_BLOCK."""

    def __init__(self, pool: BlockPool, group: int = 0, window: int | None = None, root: int | None = None):
        self.pool, self.group, self.window = pool, group, window
        self.root = root  # the prefix hash chain's start: tables with other roots (LoRA adapters) share nothing
        self.blocks: list[int] = []
        self.hashes: list[int] = []  # prefix hashes of the leading full blocks registered so far
        self.num_dropped = 0  # leading entries that are NULL_BLOCK: out of the window (or never taken)

    @property
    def num_live(self) -> int:
        return sum(b != NULL_BLOCK for b in self.blocks)

    def first_needed(self, num_computed: int) -> int:
        """Index of the first block a query at position >= num_computed can read (0 for full attention)."""
        if self.window is None:
            return 0
        return max(0, num_computed - self.window + 1) // self.pool.block_size

    def num_to_allocate(self, num_tokens: int) -> int:
        """New blocks needed to hold positions up to num_tokens - 1. (Every position before them has a block
        or, out of the window, NULL_BLOCK: a prefix hit leaves NULL_BLOCK for those, see kv_groups.py.)"""
        return max(0, -(-num_tokens // self.pool.block_size) - len(self.blocks))

    def grow(self, num_tokens: int) -> None:
        """Take the blocks `num_to_allocate` counted (the caller checked the pool has them)."""
        self.blocks.extend(self.pool.allocate() for _ in range(self.num_to_allocate(num_tokens)))

    def drop_out_of_window(self, num_computed: int) -> None:
        """Give back the blocks no query from position num_computed on can see. Safe with chunked prefill
        (the next chunk's first query is at num_computed and still reads the window before it) and with
        speculation (rejected drafts lie at >= num_computed, which never moves back while blocks are held)."""
        end = min(self.first_needed(num_computed), len(self.blocks))
        for i in range(self.num_dropped, end):
            self.pool.release(self.blocks[i])
            self.blocks[i] = NULL_BLOCK
        self.num_dropped = max(self.num_dropped, end)

    def register_full_blocks(self, tokens: Sequence[int], num_computed: int) -> None:
        """Index every block whose tokens are all computed (positions < num_computed) for prefix reuse."""
        bs = self.pool.block_size
        while len(self.hashes) < min(num_computed // bs, len(self.blocks)):
            i = len(self.hashes)
            h = chain_hash(self.hashes[-1] if self.hashes else self.root, tokens[i * bs : (i + 1) * bs])
            if self.blocks[i] != NULL_BLOCK:
                self.pool.register(self.blocks[i], (self.group, h))
            self.hashes.append(h)

    def release(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.hashes, self.num_dropped = [], [], 0


@dataclass(frozen=True)
class KVLayout:
    """Which layers share a block table, and which storage tensor each layer uses.

    Layers of the same window kind are cut, in layer order, into groups of `num_slots` layers (the fewest
    layers any window kind has: Gemma 2's alternation gives two groups of n/2, Gemma 3's 5:1 gives one
    global group and five local ones of n/6 layers each). A group with fewer layers than `num_slots` (the
    last of a kind, when the counts do not divide) leaves the rest of its blocks unused, as vLLM does;
    equal-sized groups are what lets one block id mean the same memory in every group."""

    windows: tuple[int | None, ...]  # per group: its layers' attention window (None: full attention)
    slot_of: tuple[tuple[int, int], ...]  # per layer: (group, storage slot)
    num_slots: int  # storage tensors per cached name; a block holds this many layers' tokens

    @classmethod
    def of(cls, layer_windows: Sequence[int | None]) -> KVLayout:
        if not layer_windows:
            raise ValueError("a KV layout needs at least one layer")
        kinds = list(dict.fromkeys(layer_windows))  # window kinds in order of first appearance
        per_kind = {w: [i for i, lw in enumerate(layer_windows) if lw == w] for w in kinds}
        num_slots = min(len(layers) for layers in per_kind.values())
        windows: list[int | None] = []
        slot_of: dict[int, tuple[int, int]] = {}
        for w in kinds:
            layers = per_kind[w]
            for start in range(0, len(layers), num_slots):
                for slot, layer in enumerate(layers[start : start + num_slots]):
                    slot_of[layer] = (len(windows), slot)
                windows.append(w)
        return cls(tuple(windows), tuple(slot_of[i] for i in range(len(layer_windows))), num_slots)

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    def blocks_per_sequence(self, num_tokens: int, block_size: int, step_tokens: int) -> int:
        """The most blocks one sequence of num_tokens tokens holds at once, all groups together, when a step
        adds at most step_tokens of it: a sliding group holds its window plus the step's new tokens."""
        whole = -(-num_tokens // block_size)
        return sum(
            whole if w is None else min(whole, -(-(w - 1 + step_tokens) // block_size) + 1) for w in self.windows
        )


@dataclass(frozen=True)
class CacheSpec:
    """What the cache holds per token and layer: name -> shape (k/v [K, D] for dense; c_kv [r], k_pe [dr])."""

    num_layers: int
    per_token: dict[str, tuple[int, ...]]

    def bytes_per_layer_token(self, dtype: torch.dtype) -> int:
        return sum(prod(s) for s in self.per_token.values()) * torch.empty((), dtype=dtype).element_size()

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * self.bytes_per_layer_token(dtype)


class PagedStorage:
    """The cache tensors: per name, one [num_blocks * block_size, *per_token_shape] tensor per storage slot
    (per layer, for a model with one window kind). Separate tensors (not one stacked [num_slots, ...]
    tensor) so that a compiled decode step writes a layer's new slots in place: torch.compile copies a
    whole input when a *view* of it is mutated (measured: every layer's write copied the entire stacked
    cache, 3x slower than eager)."""

    def __init__(
        self,
        spec: CacheSpec,
        pool: BlockPool,
        dtype: torch.dtype,
        device: torch.device | str,
        layout: KVLayout | None = None,
    ):
        self.spec, self.pool = spec, pool
        self.layout = layout or KVLayout.of([None] * spec.num_layers)  # None: every layer full attention
        if len(self.layout.slot_of) != spec.num_layers:
            raise ValueError(f"the layout covers {len(self.layout.slot_of)} layers, the cache {spec.num_layers}")
        slots = pool.num_blocks * pool.block_size
        self.tensors = {
            name: [_zeros(slots, *shape, dtype=dtype, device=device) for _ in range(self.layout.num_slots)]
            for name, shape in spec.per_token.items()
        }

    def view(
        self,
        seqs: Sequence[SequenceBlocks],
        past_lens: Sequence[int],
        new_lens: Sequence[int],
        *,
        row_wise: bool = False,
    ) -> PagedView:
        """The view for one forward of len(seqs) rows: row i holds new_lens[i] new tokens at positions
        past_lens[i].., right-padded to the longest. Each window kind gets its own key axis: row i's keys
        start at its first query's window start (0 for full attention). row_wise: the models compute each
        query as if alone (PagedView.query_spans)."""
        device = next(iter(self.tensors.values()))[0].device
        bs, layout = self.pool.block_size, self.layout
        T = max(new_lens)
        past, new = torch.tensor(past_lens), torch.tensor(new_lens)
        end = past + new
        query_pos = past[:, None] + torch.arange(T)[None, :]  # [B, T]
        query_real = torch.arange(T)[None, :] < new[:, None]
        keys: dict[int | None, torch.Tensor] = {}  # window -> key positions [B, S_w]
        starts: dict[int | None, torch.Tensor] = {}  # window -> each row's first key position [B]
        masks = {}
        for w in dict.fromkeys(layout.windows):
            starts[w] = start = torch.zeros_like(past) if w is None else (past - w + 1).clamp(min=0)
            keys[w] = start[:, None] + torch.arange(int((end - start).max()))[None, :]
            masks[w] = _mask(query_pos, keys[w], end, w).to(device)
        num_blocks = -(-int(end.max()) // bs)
        padded = [
            (blocks := seq.tables[g].blocks[:num_blocks]) + [NULL_BLOCK] * (num_blocks - len(blocks))
            for g in range(layout.num_groups)
            for seq in seqs
        ]  # through numpy: torch.tensor of a list of ints costs ~6x more (measured ~0.5 ms for 96 rows)
        all_ids = torch.from_numpy(np.array(padded, dtype=np.int64)).view(layout.num_groups, len(seqs), num_blocks)
        read, write = [], []
        for block_ids, w in zip(all_ids, layout.windows):
            read.append(_slots(block_ids, keys[w], bs).to(device))  # (keys past a row's end: masked)
            # padding queries write into block 0
            write.append(torch.where(query_real, _slots(block_ids, query_pos, bs), NULL_BLOCK).to(device))
        view = PagedView(self.tensors, layout.slot_of, read, write, query_pos.to(device), masks)
        if row_wise:
            rows = enumerate(zip(past_lens, new_lens))
            view.query_spans = [(i, t, p + t + 1) for i, (p, n) in rows for t in range(n)]
            view.key_starts = {w: s.tolist() for w, s in starts.items()}
        return view


def _zeros(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor whose memory becomes resident only where it is written, on CPU: fresh anonymous memory
    from the OS reads as zeros without being touched, while torch.zeros writes every page. A server's cache is
    sized for its largest load (up to EngineConfig.cache_bytes, 1 GB by default), and the process used to hold
    all of it from the start (SmolLM2 `nanoseek serve`: peak RSS 1464 MB against llama.cpp's 321)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(*shape, dtype=dtype, device=device)
    count = prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < 1 << 20:
        return torch.zeros(*shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes)  # MAP_PRIVATE | MAP_ANONYMOUS: zero-filled by the kernel, page by page
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(*shape)  # keeps `buffer` alive


def _slots(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, n] slots of positions [B, n] in each row's blocks (positions past the table: anything, masked)."""
    index = (positions // block_size).clamp(max=block_ids.shape[1] - 1)
    return torch.gather(block_ids, 1, index) * block_size + positions % block_size


def _mask(query_pos: torch.Tensor, key_pos: torch.Tensor, seq_lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] bool: a query sees its row's keys at positions <= its own (and > its own - window).
    A padding query (beyond its row's length) sees key 0 only, so its softmax is never empty."""
    key, q = key_pos[:, None, :], query_pos[:, :, None]
    allowed = (key <= q) & (key < seq_lens[:, None, None])
    if window is not None:
        allowed &= key > q - window
    allowed[:, :, 0] |= ~allowed.any(-1)
    return allowed[:, None]


@dataclass
class PagedView:
    """One forward's window onto the paged cache. Models call `update` once per layer, then attend with
    `mask(window)`; `positions` are the new tokens' positions (for rotary embeddings). Each layer reads and
    writes the slots of its own group's block table."""

    tensors: dict[str, list[torch.Tensor]]  # name -> per storage slot [slots, *shape]
    slot_of: tuple[tuple[int, int], ...]  # layer -> (group, storage slot)
    read_slots: list[torch.Tensor]  # per group [B, S_w]: the keys its window kind's mask covers
    write_slots: list[torch.Tensor]  # per group [B, T]
    positions: torch.Tensor  # [B, T]
    masks: dict[int | None, torch.Tensor]  # window -> [B, 1, T, S_w] bool
    # Row-wise forwards (speculative decoding's decodes and verifications): (row, query index, key count) of
    # every real query. The models then compute attention one query at a time over exactly the keys a lone
    # decode of it reads (key_starts: where each row's key axis begins, per window), with that decode's
    # all-true mask, and DeepSeek's MoE one token at a time, so a query's numbers are the same whatever else is in
    # the forward: alone, beside longer rows, or as position j of a verification (T = 1 + drafts). Batched,
    # they are not: on CPU, SDPA's result for a row moves by ~1e-7 with the number of query rows (its
    # matmuls change shape) and with the key padding (its reductions change blocking), and so do fp32 matmuls
    # (MLA's absorbed kv_b_proj, the router, the experts) with their row count; int8's activation rounding can
    # turn that into a different token. None: attend with the masks, all rows at once.
    query_spans: list[tuple[int, int, int]] | None = None
    key_starts: dict[int | None, list[int]] | None = None  # window -> each row's first key position
    # Dense models attend with `attend` (the paged attention kernel, engine/paged_attention.py) instead of
    # `update` + SDPA: set by the runner for every forward where the kernel runs (decodes, verifications and
    # prompt chunks: a query's numbers then depend on nothing else in the forward)
    fused_attention: bool = False
    # ...and, where the engine's fused ops build, take q, k and v as one projection's output (`attend_qkv`): the
    # rotary embedding and the cache write in one op (engine/fused_ops.py)
    fused_qkv: bool = False
    # ...and where the model's layers allow, all of them in one op (engine/layer_stack.DenseStack), set by the runner
    layer_stack: object = None
    # (group, window) -> the paged attention kernel's slots and mask [B*T, S]: the same for every layer of the group
    _kernel_inputs: dict = field(default_factory=dict, repr=False)
    is_paged = True  # what the models look for (model/ does not import the engine)

    def _store(self, layer: int, new: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Write each new tensor [B, T, *shape] at the layer's write slots; the layer's stores, in order."""
        group, slot = self.slot_of[layer]
        flat_write = self.write_slots[group].reshape(-1)
        stores = []
        for name, value in new.items():
            store = self.tensors[name][slot]
            store.index_copy_(0, flat_write, value.reshape(-1, *store.shape[1:]).to(store.dtype))
            stores.append(store)
        return stores

    def update(self, layer: int, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store each new tensor [B, T, *shape] at the layer's write slots; return the rows' histories
        [B, S_w, *shape] in the order the keywords were given."""
        read = self.read_slots[self.slot_of[layer][0]]
        dtypes = [value.dtype for value in new.values()]  # an fp16 cache's rows come back in the caller's dtype
        return tuple(store[read].to(dtype) for store, dtype in zip(self._store(layer, new), dtypes))

    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None) -> torch.Tensor:
        """Store k, v [B, T, K, D]; return the attention of q [B, T, H, D] over the keys each query's mask
        allows, read in place from the cache: [B, T, H, D]."""
        k_store, v_store = self._store(layer, {"k": k, "v": v})
        B, T, H, D = q.shape
        return self._paged_attention(layer, q.reshape(B * T, H, D), k_store, v_store, scale, window).view(B, T, H, D)

    def attend_qkv(self, layer: int, qkv, cos, sin, *, heads: int, kv_heads: int, scale: float, window: int | None):
        """`attend` for q, k and v as one projection's output qkv [B, T, (heads + 2 kv_heads) * D] before their
        rotary embedding (rotate-half; cos, sin [B, 1, T, D/2]): rotated and stored by one fused op, then
        attended in the paged attention kernel. [B, T, heads, D]."""
        B, T, _ = qkv.shape
        group, slot = self.slot_of[layer]
        k_store, v_store = self.tensors["k"][slot], self.tensors["v"][slot]
        q = rope_store(qkv, cos, sin, k_store, v_store, self.write_slots[group], heads, kv_heads)
        return self._paged_attention(layer, q, k_store, v_store, scale, window).view(B, T, heads, -1)

    def _paged_attention(self, layer: int, q, k_store, v_store, scale: float, window: int | None) -> torch.Tensor:
        """q [B*T, H, D] (row-major over the view's rows and new tokens) over the keys their masks allow."""
        slots, mask = self.kernel_inputs(layer, window, q.shape[0])
        return paged_attention(q, k_store, v_store, slots, mask, scale)

    def kernel_inputs(self, layer: int, window: int | None, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paged attention kernel's slots [B, S] and mask [B*T, S] for the layer's queries (B*T of them)."""
        key = (self.slot_of[layer][0], window)
        if key not in self._kernel_inputs:  # made once a forward, not once a layer (each reshape is a dispatch)
            read = self.read_slots[key[0]]  # [B, S]: a row's queries share its slots (the kernel tiles them)
            self._kernel_inputs[key] = read, self.masks[window].reshape(queries, read.shape[1])
        return self._kernel_inputs[key]

    def mask(self, window: int | None = None) -> torch.Tensor:
        return self.masks[window]
