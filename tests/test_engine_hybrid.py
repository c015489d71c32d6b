"""Hybrid models (Gemma 2's local/global alternation, Gemma 3's 5 local : 1 global) in the engine: one block
table per layer group, the sliding groups giving back what falls out of their window. On tiny random models
with an 8-token window, 4-token blocks and sequences several windows long: batched greedy with chunked
prefill, joins and preemption equals the full-forward reference; the sliding groups stay about a window
long while the full group grows; prefix hits, abort, finish and a full cache."""

from __future__ import annotations

import pytest
import torch

from greedy_reference import greedy_reference
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.kv_cache import BlockPool, KVLayout
from nanoseek.engine.kv_groups import SequenceBlocks
from nanoseek.engine.runner import cache_layout
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.scheduler import Status
from nanoseek.model.dense import FULL, SLIDING, DenseConfig, DenseForCausalLM

WINDOW, BLOCK = 8, 4
DIMS = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=160, norm_offset=1.0, sandwich_norm=True, embed_scale=True,
    hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=24, sliding_window=WINDOW,
)  # fmt: skip
CONFIGS = {
    # alternating local/global: two groups of 2 layers (a block holds 2 layers)
    "gemma2": dict(num_hidden_layers=4, layer_types=[SLIDING, FULL] * 2, attn_logit_softcapping=2.0,
                   final_logit_softcapping=5.0),
    # 5 local : 1 global: six groups of 1 layer (five sliding tables and one full table per sequence)
    "gemma3": dict(num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], qk_norm=True,
                   rope_local_theta=10000.0, rope_theta=1e6),
}  # fmt: skip
PROMPTS = [list(range(10, 47)), [5, 6, 7], list(range(60, 80)), [200, 3, 200, 3, 9], list(range(100, 151))]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _model(family: str) -> DenseForCausalLM:
    model = DenseForCausalLM(DenseConfig(family, **CONFIGS[family], **DIMS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def hybrid(request):
    return _model(request.param)


def _tables(engine: Engine, rid: int, window: int | None):
    return [t for t in engine.get(rid).table.tables if t.window == window]


def _run_checking_bounds(engine: Engine, ids: list[int], drafts: int = 0) -> None:
    """Step to the end; after every step, each sliding table of a decoding request holds at most
    window/block + 2 blocks (plus what its drafts took), one in a prompt chunk at most its window plus a
    chunk, and each full table one block per 4 positions held."""
    decode_bound = WINDOW // BLOCK + 2 + -(-drafts // BLOCK)
    chunk_bound = -(-(WINDOW - 1 + engine.config.max_step_tokens) // BLOCK) + 1
    while engine.has_work():
        engine.step()
        for rid in ids:
            req = engine.get(rid)
            if req.status is not Status.RUNNING:
                continue
            decoding = req.num_computed >= len(req.prompt_ids)
            for t in _tables(engine, rid, WINDOW):
                assert t.num_live <= (decode_bound if decoding else chunk_bound)
            for t in _tables(engine, rid, None):
                assert t.num_live >= -(-req.num_computed // BLOCK)


def test_batched_greedy_equals_the_reference_with_joins_chunks_and_preemption(hybrid):
    """120 one-layer blocks: two or three of these sequences (up to 75 tokens) at a time; the rest wait or are
    preempted."""
    num_slots = KVLayout.of(cache_layout(hybrid)[1]).num_slots
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK, num_blocks=1 + 120 // num_slots, max_step_tokens=8),
                    eos_ids=[])  # fmt: skip
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
    engine.step()
    engine.step()
    ids += [engine.add_request(p, GREEDY) for p in PROMPTS[3:]]  # join while the first ones run
    _run_checking_bounds(engine, ids)
    assert [engine.get(i).output_ids for i in ids] == [greedy_reference(hybrid, p, 24) for p in PROMPTS]
    assert engine.scheduler.num_preemptions > 0  # the path was exercised
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_sliding_groups_stay_a_window_long_while_the_full_group_grows(hybrid):
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK, max_step_tokens=8), eos_ids=[])
    rid = engine.add_request(PROMPTS[4], SamplingParams(temperature=0, max_tokens=60))
    sliding, full = [], []
    while engine.has_work():
        engine.step()
        if not engine.get(rid).finished:
            sliding.append(max(t.num_live for t in _tables(engine, rid, WINDOW)))
            full.append(_tables(engine, rid, None)[0].num_live)
    assert max(sliding[-50:]) <= WINDOW // BLOCK + 2  # decoding 110 tokens in: a window and a bit
    assert full[-1] >= 110 // BLOCK and full == sorted(full)
    assert engine.get(rid).output_ids == greedy_reference(hybrid, PROMPTS[4], 60)


def test_prefix_cache_hit_gives_identical_output(hybrid):
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK), eos_ids=[])
    system = list(range(30, 70))  # a 40-token shared prefix: five windows
    (a,) = engine.generate([system + [7, 8]], GREEDY)
    (b,) = engine.generate([system + [9]], GREEDY)
    assert a.num_cached_prompt == 0 and b.num_cached_prompt == 40
    assert a.token_ids == greedy_reference(hybrid, system + [7, 8], 24)
    assert b.token_ids == greedy_reference(hybrid, system + [9], 24)
    # the hit holds every full-attention block of the prefix, and sliding blocks only for its last window
    rid = engine.add_request(system + [7, 8], GREEDY)
    engine.step()
    seq = engine.get(rid).table
    assert engine.get(rid).num_cached_prompt == 40
    for t in seq.tables:
        assert t.num_live <= (-(-42 // BLOCK) if t.window is None else WINDOW // BLOCK + 2)
    while engine.has_work():
        engine.step()
    assert engine.get(rid).output_ids == a.token_ids


def test_a_prefix_hit_needs_every_group():
    """The rule on the tables alone (window 8, blocks of 4): a 40-token prefix shares the full group's ten
    blocks and the sliding group's last two (positions 32..39, what a query at 40 reads). Once the sliding
    blocks are evicted, the full group's blocks alone are no hit: a local layer would read keys that are
    not there."""
    layout = KVLayout.of([WINDOW, None])
    pool = BlockPool(64, BLOCK)
    tokens = list(range(41))
    first = SequenceBlocks(pool, layout)
    for n in range(8, 41, 8):  # a chunked prefill of 40 tokens
        assert first.reserve(n, n - 8)
        first.register_full_blocks(tokens, n)
        first.drop_out_of_window(n)
    sliding, full = first.tables
    assert (sliding.num_live, full.num_live) == (2, 10)  # positions 32..39 of the sliding layers, all 40 of the full
    last_sliding = (sliding.group, sliding.hashes[-1])
    first.release()
    hit = SequenceBlocks(pool, layout)
    assert hit.match_prefix(tokens) == 40
    assert hit.tables[0].blocks[:8] == [0] * 8 and (hit.tables[0].num_live, hit.tables[1].num_live) == (2, 10)
    hit.release()
    taken = []
    while pool.cached(last_sliding):  # the pool evicts the least recently freed: every sliding block first
        taken.append(pool.allocate())
    for block in taken:
        pool.release(block)
    assert all(pool.cached((full.group, h)) for h in full.hashes)
    assert SequenceBlocks(pool, layout).match_prefix(tokens) == 0


def test_speculative_drafts_and_rollback_keep_the_window(hybrid):
    """Prompt-lookup drafts on a repeating prompt: rejected drafts lie past num_computed and the sliding
    groups only give back what no query from num_computed on reads, so greedy output is unchanged."""
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK, max_step_tokens=8, speculative="ngram"), eos_ids=[])
    prompts = [[5, 6, 7, 8, 9] * 7, list(range(60, 80)) * 2]
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=40)) for p in prompts]
    _run_checking_bounds(engine, ids, drafts=engine.config.num_speculative_tokens)
    assert [engine.get(i).output_ids for i in ids] == [greedy_reference(hybrid, p, 40) for p in prompts]
    assert engine.stats()["num_drafted"] > engine.stats()["num_accepted"] > 0  # drafts both kept and rolled back
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_abort_and_finish_free_every_group(hybrid):
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK, max_step_tokens=16), eos_ids=[])
    keep = engine.add_request(PROMPTS[0], GREEDY)
    gone = engine.add_request(PROMPTS[4], SamplingParams(temperature=0, max_tokens=80))
    for _ in range(6):
        engine.step()
    seq = engine.get(gone).table
    held, blocks = engine.pool.num_free, seq.num_live
    assert all(t.num_live > 0 for t in seq.tables)
    assert engine.abort(gone)
    assert engine.pool.num_free == held + blocks and seq.empty
    while engine.has_work():
        engine.step()
    assert engine.get(keep).output_ids == greedy_reference(hybrid, PROMPTS[0], 24)
    assert engine.pool.num_free == engine.pool.num_blocks - 1 and engine.get(keep).table.empty


def test_a_full_cache_makes_requests_wait_and_finish_later(hybrid):
    """Room for about two of these at a time: the others wait (holding nothing), then finish correctly."""
    num_slots = KVLayout.of(cache_layout(hybrid)[1]).num_slots
    engine = Engine(hybrid, EngineConfig(block_size=BLOCK, num_blocks=1 + 80 // num_slots, max_step_tokens=8),
                    eos_ids=[])  # fmt: skip
    prompts = [list(range(20 + i, 50 + i)) for i in range(4)]
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    engine.step()
    waiting = [i for i in ids if engine.get(i).status is Status.WAITING]
    assert waiting and all(engine.get(i).table.empty for i in waiting)
    finished_at = {}
    step = 1
    while engine.has_work():
        engine.step()
        step += 1
        finished_at.update({i: step for i in ids if engine.get(i).finished and i not in finished_at})
    assert min(finished_at[i] for i in waiting) > min(finished_at.values())
    assert [engine.get(i).output_ids for i in ids] == [greedy_reference(hybrid, p, 24) for p in prompts]
    assert engine.pool.num_free == engine.pool.num_blocks - 1


def test_more_sequences_fit_in_the_same_memory():
    """Gemma 3 (5:1, tiny, window 8): 128-token sequences in the memory of 96 blocks of the one-table cache
    (a block there holds all 6 layers). One table per sequence took 32 of those blocks, so 3 sequences fitted;
    now a sequence holds 32 one-layer blocks in the full group and 3 in each of the 5 sliding groups, 47 of
    the 576 one-layer blocks, so 12 fit."""
    model = _model("gemma3")
    spec, windows = cache_layout(model)
    layout = KVLayout.of(windows)
    length, budget = 128, 96 * spec.num_layers  # budget: one-layer blocks
    before = budget // (-(-length // BLOCK) * spec.num_layers)  # every layer keeps every block
    after = budget // (layout.blocks_per_sequence(length, BLOCK, 1) * layout.num_slots)
    assert (before, after) == (3, 12)
    # the engine does hold 12 at (nearly) full length at once in that memory: 14 requests of 8 + 120 tokens
    # start together; two get preempted on the way, twelve finish together
    engine = Engine(model, EngineConfig(block_size=BLOCK, num_blocks=budget // layout.num_slots + 1,
                                        max_step_tokens=128), eos_ids=[])  # fmt: skip
    for i in range(14):
        engine.add_request([(7 * i + j) % 256 for j in range(8)], SamplingParams(temperature=0, max_tokens=120))
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, sum(r.num_computed >= length - 4 for r in engine.scheduler.running))
    assert most == after
