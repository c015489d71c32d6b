"""The compiled decode path (EngineConfig(compile=True), engine/runner.CompiledDecode) gives the tokens the
eager engine gives: batched with joins and chunked prefill, alone, seeded samples in any batch, and for
several models in one process (compiled code is cached per code object, not per model)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams
from nanoseek.quant import quantize_model
from test_engine import GREEDY, PROMPTS, _model


def _batched_with_a_join(model, compile: bool) -> list[list[int]]:
    engine = Engine(model, EngineConfig(block_size=4, max_step_tokens=8, compile=compile), eos_ids=[])
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    ids.append(engine.add_request(PROMPTS[0], GREEDY))  # joins while others decode
    while engine.has_work():
        engine.step()
    return [engine.get(i).output_ids for i in ids]


def _alone(model, prompt, compile: bool) -> list[int]:
    engine = Engine(model, EngineConfig(block_size=4, compile=compile), eos_ids=[])
    return engine.generate([prompt], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def llama():
    yield _model("llama")
    torch._dynamo.reset()  # the compiled graphs hold the test models' shapes: leave no cache behind


def test_compiled_decode_equals_eager(llama):
    eager = _batched_with_a_join(llama, compile=False)
    assert _batched_with_a_join(llama, compile=True) == eager
    assert [_alone(llama, p, compile=True) for p in [*PROMPTS, PROMPTS[0]]] == eager


def test_compiled_seed_gives_the_same_sample_in_any_batch(llama):
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=10)
    alone = Engine(llama, EngineConfig(compile=True), eos_ids=[]).generate([PROMPTS[2]], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=1, max_tokens=10), SamplingParams(temperature=0.5, max_tokens=6)]
    batch = Engine(llama, EngineConfig(compile=True), eos_ids=[]).generate(
        [PROMPTS[0], PROMPTS[2], PROMPTS[4]], [others[0], seeded, others[1]]
    )
    assert batch[1].token_ids == alone


def test_models_of_different_structure_do_not_share_a_compiled_graph(llama):
    """The compiled function skips guards on module attributes (they cost ~1 ms a token), so it must key
    its graph by model: an int8 model (fused qkv, packed linears) after an fp32 one of the same family
    runs its own graph, not the fp32 one's (which failed with KeyError 'q_proj' before the key)."""
    want_fp32 = _batched_with_a_join(llama, compile=False)
    assert _batched_with_a_join(llama, compile=True) == want_fp32
    packed = quantize_model(_model("llama"), "int8")
    assert _batched_with_a_join(packed, compile=True) == _batched_with_a_join(packed, compile=False)
    assert _batched_with_a_join(llama, compile=True) == want_fp32  # and the first model still runs its own


@pytest.mark.slow
def test_compiled_decode_with_graph_breaks_equals_eager():
    """DeepSeek-V3's routed experts stay eager (graph breaks), so its layers compile as separate graphs
    under full guards; the tokens still equal eager decoding."""
    model = _model("deepseek_v3")
    try:
        assert _batched_with_a_join(model, compile=True) == _batched_with_a_join(model, compile=False)
    finally:
        torch._dynamo.reset()


def test_warm_up_compiles_before_the_first_request(llama):
    """A server warms its engine up before it accepts requests: afterwards, requests of one row and of several
    compile nothing more. Without compile, warm_up does nothing."""
    plain = Engine(llama, EngineConfig(), eos_ids=[])
    plain.warm_up()
    assert not plain.requests and plain.pool.num_free == plain.pool.num_blocks - 1

    torch._dynamo.reset()  # the other tests' graphs would hide a missing compilation
    engine = Engine(llama, EngineConfig(block_size=4, compile=True), eos_ids=[])
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a running count: reset() keeps it
    engine.warm_up()
    assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks - 1  # every block back
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs - before >= 2  # one row, several rows
    engine.generate([PROMPTS[0]], GREEDY)
    engine.generate(PROMPTS[:3], GREEDY)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
