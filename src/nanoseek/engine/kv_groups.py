"""A sequence's cache blocks across layer groups: one block table per group of engine/kv_cache.KVLayout.

    seq = SequenceBlocks(pool, layout)
    cached = seq.match_prefix(prompt_ids)        # share what the prefix cache holds (every group, or none)
    ok = seq.reserve(num_tokens, num_computed)   # room in *every* group, or nothing is taken
    seq.drop_out_of_window(num_computed)         # sliding groups give back what no future query sees
    seq.release()                                # finished, aborted or preempted: every group's blocks

The scheduler sees one object per request, as it saw one block table before: a request is admitted or
grown only when the pool has the blocks every group needs together, and preemption frees all groups.

The prefix-cache rule for hybrid models (vLLM's): a prefix of m tokens is a hit when every full-attention
group still caches all of its blocks for positions < m, and every sliding group caches the blocks of the
last `window - 1` positions before m (those the first recomputed query, at m, reads); a sliding group's
earlier blocks are not needed, and the sequence holds NULL_BLOCK for them, as if they had slid out.
Sliding blocks are freed early, so requiring every group's whole prefix would rarely hit; requiring less
would let a local layer attend to keys that were never written. The longest m satisfying every group wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from nanoseek.engine.kv_cache import NULL_BLOCK, BlockPool, BlockTable, KVLayout, chain_hash


class SequenceBlocks:
    def __init__(self, pool: BlockPool, layout: KVLayout, root: int | None = None):
        """root: where the prefix hashes start; sequences whose keys and values differ for the same tokens (other
        LoRA adapters) take different roots, so they never share a block."""
        self.pool, self.layout, self.root = pool, layout, root
        self.tables = [BlockTable(pool, g, w, root) for g, w in enumerate(layout.windows)]

    @property
    def empty(self) -> bool:
        return not any(t.blocks for t in self.tables)

    @property
    def num_live(self) -> int:
        """Blocks this sequence holds now, every group together."""
        return sum(t.num_live for t in self.tables)

    def reserve(self, num_tokens: int, num_computed: int) -> bool:
        """Make room for positions num_computed..num_tokens-1 in every group (a sliding group first gives back
        what fell out of its window). False, and nothing taken, when the pool cannot serve every group."""
        self.drop_out_of_window(num_computed)
        if sum(t.num_to_allocate(num_tokens) for t in self.tables) > self.pool.num_free:
            return False
        for t in self.tables:
            t.grow(num_tokens)
        return True

    def drop_out_of_window(self, num_computed: int) -> None:
        for t in self.tables:
            t.drop_out_of_window(num_computed)

    def register_full_blocks(self, tokens: Sequence[int], num_computed: int) -> None:
        for t in self.tables:
            t.register_full_blocks(tokens, num_computed)

    def release(self) -> None:
        for t in self.tables:
            t.release()

    def match_prefix(self, tokens: Sequence[int]) -> int:
        """Share cached blocks for the longest prefix of `tokens` every group can serve (whole blocks only,
        and never the whole prompt: the last token must be computed to get logits). Returns its length."""
        if not self.empty:
            raise RuntimeError("match_prefix must come before any block is reserved")
        bs = self.pool.block_size
        hashes: list[int] = []
        for start in range(0, (len(tokens) - 1) // bs * bs, bs):
            hashes.append(chain_hash(hashes[-1] if hashes else self.root, tokens[start : start + bs]))
        hit = len(hashes)
        for t in self.tables:  # full groups: the leading run of cached blocks
            if t.window is None:
                hit = next((i for i, h in enumerate(hashes[:hit]) if not self.pool.cached((t.group, h))), hit)
        while hit and not all(self._serves(t, hashes, hit) for t in self.tables if t.window is not None):
            hit -= 1
        self.pool.queries += len(hashes)
        self.pool.hits += hit
        for t in self.tables:
            first = t.first_needed(hit * bs)
            t.blocks = [NULL_BLOCK] * first + [self.pool.lookup((t.group, h)) for h in hashes[first:hit]]
            t.hashes, t.num_dropped = hashes[:hit], first
        return hit * bs

    def _serves(self, table: BlockTable, hashes: list[int], hit: int) -> bool:
        """Whether a sliding group caches the blocks a query at position hit * block_size reads."""
        first = table.first_needed(hit * self.pool.block_size)
        return all(self.pool.cached((table.group, h)) for h in hashes[first:hit])
