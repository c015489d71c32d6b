"""engine/layer_stack.DenseStack: every layer of a Llama-shaped model in one native op must give the module path's
logits bit for bit (prompt chunks, batched decodes, a sliding window, q/k/v biases, Q8_0-block and fp32 projections)
and must stand aside where it does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanoseek.engine import layer_stack, paged_attention
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.kv_groups import SequenceBlocks
from nanoseek.engine.runner import Row
from nanoseek.model.dense import DenseConfig, DenseForCausalLM
from nanoseek.quant import int4_kernel_available

pytestmark = pytest.mark.skipif(
    not (paged_attention.available() and int4_kernel_available() and layer_stack.KERNEL.available()),
    reason="the native kernels cannot run here",
)


def _model(family: str = "llama", mode: str = "int4", **config):
    from nanoseek.quant import fuse_projections, quantize_model

    torch.manual_seed(0)
    sizes = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256)  # fmt: skip
    model = DenseForCausalLM(DenseConfig(family, num_hidden_layers=3, **sizes, **config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0))
    return quantize_model(model.eval(), mode) if mode != "fp32" else fuse_projections(model.eval())


def _logits(engine: Engine, stacked: bool) -> list[torch.Tensor]:
    """Every forward's logits: two prompts prefilled in chunks side by side, then 6 greedy decode steps of both."""
    runner = engine.runner
    assert runner.layer_stack is not None
    stack, runner.layer_stack = runner.layer_stack, (runner.layer_stack if stacked else None)
    prompts = [[(7 * i + 3) % 509 for i in range(70)], [(5 * i + 1) % 509 for i in range(41)]]
    seqs = [SequenceBlocks(engine.pool, runner.layout) for _ in prompts]
    for seq, prompt in zip(seqs, prompts):
        assert seq.reserve(len(prompt) + 8, 0)
    out, done = [], [0, 0]
    try:
        while any(d < len(p) for d, p in zip(done, prompts)):  # chunks of 32 (the shorter prompt ends first)
            rows = [Row(s, d, p[d : d + 32]) for s, d, p in zip(seqs, done, prompts) if d < len(p)]
            result = runner.forward(rows)
            out.append(result.logits)
            for row in rows:
                done[seqs.index(row.table)] += len(row.token_ids)
        last = [int(t) for t in out[-1].reshape(-1, out[-1].shape[-1]).argmax(-1)][-2:]
        for _ in range(6):
            result = runner.forward([Row(s, d, [t]) for s, d, t in zip(seqs, done, last)])
            out.append(result.logits)
            last = [int(t) for t in result.logits.reshape(2, -1).argmax(-1)]
            done = [d + 1 for d in done]
        return out
    finally:
        runner.layer_stack = stack
        for seq in seqs:
            seq.release()


@pytest.mark.parametrize(
    "family,mode,config",
    [
        ("llama", "int4", {"tie_word_embeddings": True}),
        ("qwen2", "int4", {"qkv_bias": True}),
        ("mistral", "int4", {"sliding_window": 24, "layer_types": ["sliding_attention"] * 3}),
        ("llama", "fp32", {}),
    ],
)
def test_stack_gives_the_module_paths_logits_bit_for_bit(family, mode, config):
    model = _model(family, mode, **config)
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=64), eos_ids=[])
    stacked, modules = _logits(engine, True), _logits(engine, False)
    assert len(stacked) == len(modules) == 9
    for a, b in zip(stacked, modules):
        assert torch.equal(a, b)


def test_q8_blocks_projection_runs_in_the_stack():
    from nanoseek.quant import Int8BlockLinear

    model = _model()
    layer = model.model.layers[1]
    weight = 0.1 * torch.randn(layer.mlp.down_proj.out_features, layer.mlp.down_proj.in_features)
    layer.mlp.down_proj = Int8BlockLinear(weight)
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=64), eos_ids=[])
    assert layer_stack.Q8_BLOCKS in engine.runner.layer_stack.kinds
    for a, b in zip(_logits(engine, True), _logits(engine, False)):
        assert torch.equal(a, b)


def test_greedy_generation_is_the_same_with_and_without_the_stack(monkeypatch):
    from nanoseek.engine.sampling import SamplingParams

    model = _model()
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)
    prompts = [[(3 * i + 2) % 509 for i in range(50)], [9, 8, 7]]

    def run():
        engine = Engine(model, EngineConfig(block_size=16, max_step_tokens=40), eos_ids=[])
        ids = [engine.add_request(p, params) for p in prompts]
        while engine.has_work():
            engine.step()
        return engine, [(list(engine.requests[i].output_ids), engine.requests[i].logprobs) for i in ids]

    engine, stacked = run()
    assert engine.runner.layer_stack is not None
    monkeypatch.setattr(layer_stack.DenseStack, "of", classmethod(lambda cls, model: None))
    engine, modules = run()
    assert engine.runner.layer_stack is None
    assert stacked == modules


def test_stack_stands_aside_where_it_does_not_apply():
    from nanoseek.engine import fused_ops

    for shape in ({"sandwich_norm": True}, {"qk_norm": True}, {"attn_logit_softcapping": 50.0}):  # Gemma's
        model = _model("llama", "int4", **shape)
        fused_ops.install(model)
        assert layer_stack.DenseStack.of(model) is None, shape
    int8_rows = _model("llama", "int8")  # one activation scale per row: Int8Linear, not an op the stack calls
    fused_ops.install(int8_rows)
    assert layer_stack.DenseStack.of(int8_rows) is None
    plain = _model("llama", "int4")  # without the fused norm/activation kernels installed
    assert layer_stack.DenseStack.of(plain) is None
    fused_ops.install(plain)
    assert layer_stack.DenseStack.of(plain) is not None
    plain.model.layers[0].self_attn.o_proj = nn.Identity()  # a projection it cannot run
    assert layer_stack.DenseStack.of(plain) is None


def test_engine_ab_alternates_the_arms_after_checking_their_tokens():
    """bench/engine_ab (benchmarks/layer_stack.py, kv_cache_dtype.py): the arms' greedy tokens are compared before
    timing, and every round times both."""
    from nanoseek.bench.engine_ab import Arm, alternate

    def without_stack(engine):
        engine.runner.layer_stack = None

    model = _model()
    arms = {"stack": Arm(), "layer loop": Arm(adjust=without_stack)}
    (agree, total), ratios, speeds = alternate(model, [5, 6, 7] * 10, 6, arms, 2, require_equal=True)
    assert agree == total == 7 and len(ratios) == 2 and all(len(v) == 2 for v in speeds.values())
    flip = lambda engine: engine.runner.model.model.layers[0].input_layernorm.weight.data.mul_(-1)  # noqa: E731
    broken = {"stack": Arm(), "other weights": Arm(adjust=flip)}
    with pytest.raises(SystemExit, match="part at greedy token"):
        alternate(model, [5, 6, 7] * 10, 6, broken, 1, require_equal=True)
