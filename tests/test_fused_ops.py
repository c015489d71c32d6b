"""The fused inference ops (engine/fused_ops.py): RMSNorm in one op, and the rotary embedding with the cache
write; the same numbers as the unfused path, used by the engine, and never by training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.engine import fused_ops
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope_half

pytestmark = pytest.mark.skipif(not fused_ops.available(), reason="the fused ops cannot run here")


@pytest.mark.parametrize("d", [64, 576, 20])  # 20: a width the 8-lane loop leaves a tail of
def test_rms_norm_matches_torch(d):
    gen = torch.Generator().manual_seed(d)
    x, w = torch.randn(3, 5, d, generator=gen) * 3, torch.randn(d, generator=gen)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (d,), w, 1e-5), rtol=2e-6, atol=2e-6)
    gemma = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w)  # Gemma's (1 + w)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6, 1.0), gemma, rtol=2e-6, atol=2e-6)
    strided = x.transpose(0, 1)  # a non-contiguous input is read correctly
    torch.testing.assert_close(fused_ops.rms_norm(strided, w, 1e-5), F.rms_norm(strided, (d,), w, 1e-5))


def test_silu_mul_matches_torch():
    gate_up = torch.randn(2, 3, 2 * 96, generator=torch.Generator().manual_seed(1)) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=2e-6)
    with pytest.raises(RuntimeError, match="gate and up"):
        fused_ops.silu_mul(torch.zeros(2, 5))


def test_rope_store_gives_the_unfused_bits():
    gen = torch.Generator().manual_seed(0)
    N, H, K, D, slots = 5, 6, 2, 16, 40
    qkv = torch.randn(N, (H + 2 * K) * D, generator=gen)
    angles = torch.randn(N, D // 2, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    k_store, v_store = torch.randn(slots, K, D, generator=gen), torch.randn(slots, K, D, generator=gen)
    write = torch.tensor([3, 17, 0, 39, 8])
    k_want, v_want = k_store.clone(), v_store.clone()
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    rot = lambda x, heads: apply_rope_half(x.view(N, heads, D), cos[:, None], sin[:, None])  # noqa: E731
    k_want.index_copy_(0, write, rot(k, K))
    v_want.index_copy_(0, write, v.reshape(N, K, D))

    k_before, v_before = k_store.clone(), v_store.clone()
    q_got = fused_ops.rope_store(qkv, cos, sin, k_store, v_store, write, H, K)
    assert torch.equal(q_got, rot(q, H))
    assert torch.equal(k_store, k_want)  # written slots rotated, every other slot untouched
    assert torch.equal(v_store, v_want)
    # the model's and the view's shapes ([B, T, X], [B, 1, T, D/2], [B, T]) are taken as they are
    k_store.copy_(k_before), v_store.copy_(v_before)
    q_nd = fused_ops.rope_store(qkv.view(1, N, -1), cos.view(1, 1, N, -1), sin.view(1, 1, N, -1), k_store, v_store,
                                write.view(1, N), H, K)  # fmt: skip
    assert torch.equal(q_nd, q_got) and torch.equal(k_store, k_want) and torch.equal(v_store, v_want)


def test_rope_store_refuses_bad_input():
    k_store = v_store = torch.zeros(4, 2, 8)
    qkv, cos = torch.zeros(1, (3 + 4) * 8), torch.zeros(1, 4)
    with pytest.raises(RuntimeError, match="width must be"):
        fused_ops.rope_store(qkv, cos, cos, k_store, v_store, torch.tensor([0]), 4, 2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        fused_ops.rope_store(qkv, cos, cos, k_store, v_store, torch.tensor([4]), 3, 2)
    with pytest.raises(RuntimeError, match="fp32"):
        fused_ops.rope_store(qkv.double(), cos, cos, k_store, v_store, torch.tensor([0]), 3, 2)
    with pytest.raises(RuntimeError, match="D/2 values for each of the N rows"):
        fused_ops.rope_store(qkv, torch.zeros(2, 4), cos, k_store, v_store, torch.tensor([0]), 3, 2)
    with pytest.raises(RuntimeError, match="one write slot per row"):
        fused_ops.rope_store(qkv, cos, cos, k_store, v_store, torch.tensor([0, 1]), 3, 2)


def _llama():
    from nanoseek.model.dense import DenseConfig, DenseForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=96)  # fmt: skip
    return DenseForCausalLM(DenseConfig("llama", num_hidden_layers=2, **sizes)).eval()


def test_engine_decodes_with_them_as_without(monkeypatch):
    prompts = [[5, 6, 7, 8, 9], [17, 3], list(range(20, 47))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    fused_engine = Engine(_llama(), EngineConfig(num_blocks=32), eos_ids=[])
    assert fused_engine.runner.fused_qkv
    norms = [m for m in fused_engine.runner.model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.inference_kernel is fused_ops.rms_norm for m in norms)
    assert fused_engine.runner.model.model.layers[0].mlp.inference_act_mul is fused_ops.silu_mul
    fused = fused_engine.generate(prompts, params)

    monkeypatch.setattr(fused_ops.KERNEL, "unavailable_reason", lambda: "could not be built (test)")
    plain_engine = Engine(_llama(), EngineConfig(num_blocks=32), eos_ids=[])
    assert not plain_engine.runner.fused_qkv
    assert all(m.inference_kernel is None for m in plain_engine.runner.model.modules() if isinstance(m, RMSNorm))
    for a, b in zip(fused, plain_engine.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la["logprob"] - lb["logprob"]) < 1e-4


def test_training_never_takes_the_kernel():
    model = _llama().train()
    reference = _llama().train()
    assert fused_ops.install(model)
    ids = torch.randint(0, 256, (2, 9))
    grads = []
    for m in (model, reference):
        m.compute_loss(ids[:, :-1], ids[:, 1:]).loss.backward()
        grads.append(m.model.norm.weight.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])


def test_rope_store_rounds_into_an_fp16_cache_as_torch_does():
    torch.manual_seed(0)
    H, K, D, N = 6, 2, 16, 5
    qkv, cos, sin = torch.randn(N, (H + 2 * K) * D), torch.randn(N, D // 2), torch.randn(N, D // 2)
    slots = torch.tensor([3, 7, 0, 9, 4])
    k32, v32 = torch.zeros(12, K, D), torch.zeros(12, K, D)
    k16, v16 = k32.half(), v32.half()
    q32 = fused_ops.rope_store(qkv, cos, sin, k32, v32, slots, H, K)
    q16 = fused_ops.rope_store(qkv, cos, sin, k16, v16, slots, H, K)
    assert torch.equal(q16, q32) and torch.equal(k16, k32.half()) and torch.equal(v16, v32.half())
