"""DeepSeek-V3 equivalence with transformers (fp32, max abs diff <= TOL), both loading directions,
plus the cache, padding, absorbed-attention and routing checks, and proof that TOL catches small bugs."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from deepseek_reference import random_hf_model, randomize_nanoseek
from greedy_reference import paged_forward_in_chunks
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.rope import rope_inv_freq
from nanoseek.weights.hf_folder import save_pretrained

# Measured max |diff| over every comparison below: 4.2e-7 (logits of magnitude ~0.5). TOL leaves ~5x headroom
# for other CPUs' summation orders, and is small enough that the mutations in MUTATIONS all fail it.
TOL = 2e-6

VARIANTS = {
    "tiny": {},
    "no_q_lora": {"q_lora_rank": None},
    "yarn": {
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
    # mscale != mscale_all_dim: cos/sin carry mscale(f, mscale) / mscale(f, mscale_all_dim) (transformers'
    # attention_factor) and the softmax scale mscale(f, mscale_all_dim)^2. DeepSeek-V2-Lite uses 0.707.
    "yarn_mscale": {
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
        },
    },
    "groups4": {"n_group": 4, "topk_group": 2},
    "no_interleave_tied": {"rope_interleave": False, "tie_word_embeddings": True},
}


def seq_len(variant: str) -> int:
    return 40 if variant.startswith("yarn") else 24  # YaRN: beyond original_max_position_embeddings


def tokens(B=2, T=24, seed=1, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_to_nanoseek(tmp_path, variant):
    cfg = from_name("test-tiny", **VARIANTS[variant])
    ref = random_hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    x = tokens(T=seq_len(variant))
    with torch.no_grad():
        expected = ref(x).logits
        got = ours(x)
    assert got.shape == expected.shape == (2, x.shape[1], cfg.vocab_size)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora", "yarn", "yarn_mscale", "groups4"])
def test_nanoseek_to_hf(tmp_path, variant):
    from transformers import AutoModelForCausalLM

    cfg = from_name("test-tiny", **VARIANTS[variant])
    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(cfg).eval()
    randomize_nanoseek(ours)
    save_pretrained(ours, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    x = tokens(T=seq_len(variant))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= TOL


# ---- the tolerance catches small bugs ------------------------------------------------------------------------
# Each mutation is a plausible slip in nanoseek's model; applied to a loaded model, it must push the logits
# past TOL (by 3x, clear of rounding) in every variant. Measured: norm eps 5e-3 to 0.19, YaRN swap 1.6e-3, RoPE
# base 6e-5 to 1.4e-4 (which TOL = 1e-4 let through in four of six variants).


def _norm_eps_x10(model: DeepseekV3ForCausalLM) -> None:
    for layer in model.model.layers:
        layer.input_layernorm.eps *= 10
        layer.post_attention_layernorm.eps *= 10


def _rope_base_off(model: DeepseekV3ForCausalLM) -> None:
    cfg = model.config  # 10% off: e.g. a base read from the wrong field
    inv_freq, _ = rope_inv_freq(
        cfg.qk_rope_head_dim, cfg.rope_theta * 1.1, cfg.rope_scaling, cfg.max_position_embeddings
    )
    model.inv_freq = inv_freq


def _yarn_mscales_swapped(model: DeepseekV3ForCausalLM) -> None:
    cfg = model.config
    rs = dict(cfg.rope_scaling)
    rs["mscale"], rs["mscale_all_dim"] = rs["mscale_all_dim"], rs["mscale"]
    _, model.rope_attention_factor = rope_inv_freq(
        cfg.qk_rope_head_dim, cfg.rope_theta, rs, cfg.max_position_embeddings
    )
    for layer in model.model.layers:
        layer.self_attn.scale = cfg.replace(rope_scaling=rs).softmax_scale


MUTATIONS = {
    "norm_eps_x10": _norm_eps_x10,
    "rope_base_off": _rope_base_off,
    "yarn_mscales_swapped": _yarn_mscales_swapped,
}
MUTATION_CASES = [(v, m) for v in VARIANTS for m in ("norm_eps_x10", "rope_base_off")] + [
    ("yarn_mscale", "yarn_mscales_swapped")  # the only variant where the swap changes anything
]


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """variant -> (folder with transformers' random model, input ids, transformers' logits), built once."""
    built = {}

    def get(variant: str):
        if variant not in built:
            folder = tmp_path_factory.mktemp(variant)
            ref = random_hf_model(from_name("test-tiny", **VARIANTS[variant]))
            ref.save_pretrained(folder)
            x = tokens(T=seq_len(variant))
            with torch.no_grad():
                built[variant] = (folder, x, ref(x).logits)
        return built[variant]

    return get


@pytest.mark.parametrize(("variant", "mutation"), MUTATION_CASES)
def test_tolerance_catches_small_bugs(hf_reference, variant, mutation):
    folder, x, expected = hf_reference(variant)
    ours = nanoseek.load(folder)
    with torch.no_grad():
        assert (ours(x) - expected).abs().max().item() <= TOL
        MUTATIONS[mutation](ours)
        diff = (ours(x) - expected).abs().max().item()
    assert diff > 3 * TOL, f"{mutation} in {variant}: max |diff| {diff:.2e} is within 3x TOL"


def test_padded_batch_matches_hf_and_unpadded(tmp_path):
    cfg = from_name("test-tiny")
    ref = random_hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    x = tokens(B=3, T=16)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    with torch.no_grad():
        expected = ref(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
        real = mask.bool()
        assert (got[real] - expected[real]).abs().max().item() <= TOL
        # A left-padded row with proper positions gives the logits of the unpadded sequence.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = ours(x[:1], attention_mask=mask[:1], position_ids=pos[:1])[0, 5:]
        alone = ours(x[:1, 5:])[0]
        assert (padded - alone).abs().max().item() <= TOL


def test_kv_cache_decode_equals_full_forward():
    """Prefill 8, then one token per forward through the engine's paged latent cache, equals one full
    forward (the absorbed attention against the naive one)."""
    cfg = from_name("test-tiny", num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_nanoseek(model)
    x = tokens(B=2, T=20)
    with torch.no_grad():
        full = model(x)
    cached = paged_forward_in_chunks(model, x, [8] + [1] * 12)
    assert (cached - full).abs().max().item() <= TOL


def test_absorbed_attention_matches_naive_and_cache_is_latent_only():
    from nanoseek.engine.kv_cache import BlockPool, KVLayout, PagedStorage
    from nanoseek.engine.kv_groups import SequenceBlocks
    from nanoseek.engine.runner import cache_layout
    from nanoseek.model.rope import rope_cos_sin

    cfg = from_name("test-tiny")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_nanoseek(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 10, cfg.hidden_size)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(10)[None], model.rope_attention_factor)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    spec, _ = cache_layout(model)
    pool = BlockPool(8, 4)
    storage = PagedStorage(spec, pool, torch.float32, "cpu")
    tables = [SequenceBlocks(pool, KVLayout.of([None] * spec.num_layers)) for _ in range(2)]
    for t in tables:
        assert t.reserve(10, 0)
    with torch.no_grad():
        naive = attn(x, cos, sin, None, None)
        absorbed = attn(x, cos, sin, None, storage.view(tables, [0, 0], [10, 10]))
    assert (naive - absorbed).abs().max().item() <= 1e-5
    # The cache holds c_kv and k_pe only: (kv_lora_rank + qk_rope_head_dim) values per token per layer.
    assert set(storage.tensors) == {"c_kv", "k_pe"}
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert spec.bytes_per_token(torch.float32) == per_token
    naive_cache = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    assert per_token < naive_cache / 4


def test_mtp_weights_roundtrip_and_hf_ignores_them(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = from_name("test-tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    ours = DeepseekV3ForCausalLM(cfg).eval()
    randomize_nanoseek(ours)
    save_pretrained(ours, tmp_path)
    back = nanoseek.load(tmp_path)
    assert len(back.mtp) == 2
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    x = tokens()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= TOL
        out = back.compute_loss(x, torch.roll(x, -1, 1))
        assert out.mtp_loss is not None and len(out.mtp_losses) == 2
