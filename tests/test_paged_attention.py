"""The paged attention kernel (engine/paged_attention.py): SDPA's numbers, keys read in place from the cache,
each query independent of its batch, and the engine's decodes running on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek.engine import paged_attention
from nanoseek.engine.engine import Engine, EngineConfig
from nanoseek.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not paged_attention.available(), reason="the paged attention kernel cannot run here")


def _case(n: int, S: int, H: int, K: int, D: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    slots_total = 512
    k_store, v_store = torch.randn(slots_total, K, D, generator=gen), torch.randn(slots_total, K, D, generator=gen)
    q = torch.randn(n, H, D, generator=gen)
    slots = torch.stack([torch.randperm(slots_total, generator=gen)[:S] for _ in range(n)])
    lens = torch.randint(1, S + 1, (n,), generator=gen)
    lens[0] = S
    starts = (lens - 5).clamp(min=0) * (torch.arange(n) % 2)  # odd queries: a window of 5 keys
    pos = torch.arange(S)
    mask = (pos[None] < lens[:, None]) & (pos[None] >= starts[:, None])
    return q, k_store, v_store, slots, mask


def _sdpa(q, k_store, v_store, slots, mask, scale):
    k, v = k_store[slots].transpose(1, 2), v_store[slots].transpose(1, 2)  # [n, K, S, D]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)  # fmt: skip
    return out[:, :, 0]


@pytest.mark.parametrize("H,K,D", [(9, 3, 64), (4, 4, 128), (6, 2, 20)])  # GQA, MHA, a D the AVX2 path skips
def test_kernel_matches_sdpa_over_the_gathered_keys(H, K, D):
    q, k_store, v_store, slots, mask = _case(7, 37, H, K, D)
    got = paged_attention.paged_attention(q, k_store, v_store, slots, mask, 0.125)
    torch.testing.assert_close(got, _sdpa(q, k_store, v_store, slots, mask, 0.125), rtol=1e-5, atol=1e-5)


def test_a_query_gives_the_same_bits_alone_and_beside_longer_rows():
    q, k_store, v_store, slots, mask = _case(5, 40, 9, 3, 64, seed=1)
    batched = paged_attention.paged_attention(q, k_store, v_store, slots, mask, 0.125)
    for i in range(5):
        keys = int(mask[i].nonzero().max()) + 1  # alone: its own keys only, no padding after them
        alone = paged_attention.paged_attention(q[i : i + 1], k_store, v_store, slots[i : i + 1, :keys],
                                                mask[i : i + 1, :keys], 0.125)  # fmt: skip
        assert torch.equal(alone[0], batched[i])


def test_bad_shapes_are_refused():
    q, k_store, v_store, slots, mask = _case(2, 8, 9, 3, 64)
    with pytest.raises(RuntimeError, match="multiple of the cache's heads"):
        paged_attention.paged_attention(q[:, :8], k_store, v_store, slots, mask, 1.0)
    with pytest.raises(RuntimeError, match="fp32"):
        paged_attention.paged_attention(q.double(), k_store, v_store, slots, mask, 1.0)


def _llama():
    from nanoseek.model.dense import DenseConfig, DenseForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=96)  # fmt: skip
    cfg = DenseConfig("llama", num_hidden_layers=2, **sizes)
    return DenseForCausalLM(cfg).eval()


def test_engine_decodes_dense_models_on_it_and_matches_sdpa():
    model = _llama()
    prompts = [[5, 6, 7, 8, 9], [17, 3], list(range(20, 47))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    runs = {}
    for fused in (True, False):
        engine = Engine(model, EngineConfig(num_blocks=32, fused_attention=fused), eos_ids=[])
        assert engine.runner.fused_attention is fused
        runs[fused] = engine.generate(prompts, params)
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la["logprob"] - lb["logprob"]) < 1e-4


def test_models_it_does_not_cover_keep_sdpa(monkeypatch):
    from nanoseek.model.config import from_name
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    deepseek = DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    assert not Engine(deepseek, EngineConfig(num_blocks=16), eos_ids=[]).runner.fused_attention  # MLA
    monkeypatch.setattr(paged_attention.KERNEL, "unavailable_reason", lambda: "could not be built (test)")
    engine = Engine(_llama(), EngineConfig(num_blocks=16), eos_ids=[])
    assert not engine.runner.fused_attention
    assert len(engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0].token_ids) == 4


def test_loading_the_kernels_leaves_the_processs_floating_point_alone():
    """A library linked with -ffast-math switches the process to flushing subnormals to zero when it loads
    (g++ < 13 links crtfastmath.o): nanoseek.native compiles with the flags and links without them."""
    from nanoseek.quant import q4_kernel

    q4_kernel.available()
    assert paged_attention.available()
    tiny = 5e-324  # the smallest subnormal double
    assert tiny * 1.0 == tiny
    assert torch.tensor(1e-40, dtype=torch.float32).mul(1.0).item() != 0.0


@pytest.mark.parametrize("H,K,D", [(9, 3, 64), (6, 2, 20)])  # the vector path and the scalar one
def test_an_fp16_cache_gives_the_fp32_kernels_bits_on_its_rounded_rows(H, K, D):
    q, k_store, v_store, slots, mask = _case(7, 37, H, K, D)
    k16, v16 = k_store.half(), v_store.half()
    got = paged_attention.paged_attention(q, k16, v16, slots, mask, 0.125)
    assert torch.equal(got, paged_attention.paged_attention(q, k16.float(), v16.float(), slots, mask, 0.125))
    # a prompt chunk: 8 queries share each of 2 slots rows
    chunk = paged_attention.paged_attention(q[:2].repeat_interleave(8, 0), k16, v16, slots[:2],
                                            mask[:2].repeat_interleave(8, 0), 0.125)  # fmt: skip
    assert torch.equal(chunk[::8], got[:2])
    torch.testing.assert_close(got, _sdpa(q, k_store, v_store, slots, mask, 0.125), rtol=0, atol=2e-3)
    with pytest.raises(RuntimeError, match="K and V alike"):
        paged_attention.paged_attention(q, k16, v_store, slots, mask, 0.125)


def test_kv_cache_dtype_auto_takes_fp16_for_quantized_models_and_halves_the_cache():
    from nanoseek.model.config import from_name
    from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
    from nanoseek.quant import quantize_model

    def cache_bytes(engine):
        return sum(t.numel() * t.element_size() for ts in engine.runner.storage.tensors.values() for t in ts)

    assert Engine(_llama(), EngineConfig(num_blocks=16), eos_ids=[]).runner.kv_dtype == torch.float32  # fp32: exact
    model = quantize_model(_llama(), "int8")
    auto = Engine(model, EngineConfig(num_blocks=16), eos_ids=[])
    same = Engine(model, EngineConfig(num_blocks=16, kv_cache_dtype="model"), eos_ids=[])
    assert auto.runner.kv_dtype == torch.float16 and same.runner.kv_dtype == torch.float32
    assert 2 * cache_bytes(auto) == cache_bytes(same)
    # sized by bytes, an fp16 cache holds twice the blocks
    budget = 16 * cache_bytes(same) // 16  # the 16 blocks' bytes
    assert (
        Engine(model, EngineConfig(cache_bytes=budget), eos_ids=[]).pool.num_blocks
        == 2 * Engine(model, EngineConfig(cache_bytes=budget, kv_cache_dtype="model"), eos_ids=[]).pool.num_blocks
    )
    prompts, params = [[5, 6, 7, 8, 9], list(range(20, 47))], SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    for a, b in zip(auto.generate(prompts, params), same.generate(prompts, params)):
        assert a.token_ids == b.token_ids  # a random tiny model: no near-ties at these prompts
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la["logprob"] - lb["logprob"]) < 1e-2
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int8")
    torch.manual_seed(0)
    deepseek = DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    with pytest.raises(ValueError, match="needs the paged attention kernel"):
        Engine(deepseek, EngineConfig(num_blocks=16, kv_cache_dtype="fp16"), eos_ids=[])
    assert Engine(deepseek, EngineConfig(num_blocks=16), eos_ids=[]).runner.kv_dtype == torch.float32
