"""The dense families against transformers: tiny random models, saved as HF folders, loaded with
`nanoseek.load`; logits must match to TOL in fp32 (plain, left-padded batch, and decoding through the
engine's paged cache), and TOL is tight enough that small bugs (a 10x norm eps, a RoPE base 10% off) fail it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import nanoseek
from greedy_reference import paged_forward_in_chunks
from nanoseek.model.dense import DenseForCausalLM, dense_config_from_hf
from nanoseek.quant import int4_kernel_available
from nanoseek.weights.hf_folder import save_pretrained

transformers = pytest.importorskip("transformers")
INT4 = pytest.param("int4", marks=pytest.mark.skipif(
    not int4_kernel_available(), reason="nanoseek's int4 kernel needs AVX2"))  # fmt: skip

# Measured max |diff| against transformers: 3.1e-6 (logits of magnitude ~5); TOL leaves ~3x headroom. KV-cached
# decode against the full forward differs more (different matmul shapes; measured 6.2e-6): CACHE_TOL.
# Mutations measured: norm eps x10 1.8e-3 to 4.5e-3 (Gemma 2/3, whose embeddings are scaled by sqrt(d): 4e-5,
# which TOL = 1e-4 let through), RoPE base 10% off 1e-2 to 0.2.
TOL = 1e-5
CACHE_TOL = 2e-5
COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def _configs():
    llama3_rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    return {
        # SmolLM2-like: tied embeddings; Llama 3.x rope scaling with a short original context so it bites.
        "llama": transformers.LlamaConfig(
            **COMMON, num_hidden_layers=2, tie_word_embeddings=True, rope_parameters=llama3_rope
        ),
        "mistral": transformers.MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=4),
        "qwen2": transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True),
        # Qwen2's optional sliding window on the layers from max_window_layers on.
        "qwen2+window": transformers.Qwen2Config(
            **COMMON, num_hidden_layers=2, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),
        # Small caps and window so soft-capping and local attention actually change the result.
        "gemma2": transformers.Gemma2Config(
            **COMMON,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        ),  # fmt: skip
        "gemma3": transformers.Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0},
            },
        ),  # fmt: skip
    }


def _randomize(model, gemma: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(0.1 * noise + (0.0 if gemma else 1.0))
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module", params=list(_configs()))
def pair(request, tmp_path_factory):
    """(family, transformers model, nanoseek model) sharing one random checkpoint."""
    family = request.param
    cfg = _configs()[family]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    _randomize(ref, family.startswith("gemma"))
    folder = tmp_path_factory.mktemp(family.replace("+", "_"))
    ref.save_pretrained(folder)
    ours = nanoseek.load(folder)
    return family, ref, ours


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_loads_as_dense_model(pair):
    family, _, ours = pair
    assert isinstance(ours, DenseForCausalLM)
    assert ours.config.model_type.startswith(family.split("+")[0])


def test_logits_match_transformers(pair):
    _, ref, ours = pair
    ids = _ids(2, 12)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_left_padded_batch_matches(pair):
    _, ref, ours = pair
    ids = _ids(3, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_cached_decode_equals_full_forward(pair):
    """A prefill of 5 then one token per forward through the engine's paged cache (blocks of 4, so rows
    span several blocks; the window families' masks slide) equals one full forward."""
    _, _, ours = pair
    ids = _ids(2, 11, seed=3)
    with torch.no_grad():
        full = ours(ids)
    cached = paged_forward_in_chunks(ours, ids, [5] + [1] * 6)
    assert (cached - full).abs().max().item() <= CACHE_TOL


def _norm_eps_x10(model: DenseForCausalLM) -> None:
    for layer in model.model.layers:
        for module in layer.modules():
            if hasattr(module, "eps"):
                module.eps *= 10


def _rope_base_off(model: DenseForCausalLM) -> None:
    cfg = model.config  # 10% off, global and (Gemma 3) local bases alike
    local = cfg.rope_local_theta * 1.1 if cfg.rope_local_theta is not None else None
    model.config = dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 1.1, rope_local_theta=local)
    model._rope.clear()


@pytest.mark.parametrize("mutation", [_norm_eps_x10, _rope_base_off], ids=["norm_eps_x10", "rope_base_off"])
def test_tolerance_catches_small_bugs(pair, mutation):
    family, ref, ours = pair
    ids = _ids(2, 12)
    mutated = copy.deepcopy(ours)
    mutation(mutated)
    with torch.no_grad():
        diff = (mutated(ids) - ref(ids).logits).abs().max().item()
    assert diff > 3 * TOL, f"{mutation.__name__} in {family}: max |diff| {diff:.2e} is within 3x TOL"


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt_neox'; supported: .*gemma2.*llama"):
        nanoseek.load(tmp_path)


def test_gemma3_multimodal_folder_loads_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration folder (model_type gemma3, text_config nested, weights under
    language_model.*): nanoseek loads the text decoder, which gives the same text-only logits."""
    text = transformers.Gemma3TextConfig(
        **{**COMMON, "vocab_size": 300}, num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    cfg = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).float().eval()
    _randomize(ref, gemma=True)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    assert ours.config.model_type == "gemma3_text"
    ids = _ids(2, 9)
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["int8", "fp16", INT4])
def test_packing_while_loading_equals_quantizing_after(pair, mode, tmp_path):
    from nanoseek.quant import quantize_model

    _, ref, _ = pair
    ref.save_pretrained(tmp_path)
    packed = nanoseek.load(tmp_path, quant=mode)
    after = quantize_model(nanoseek.load(tmp_path), mode)
    assert [type(m) for m in packed.modules()] == [type(m) for m in after.modules()]
    ids = _ids(2, 9)
    with torch.no_grad():
        assert torch.equal(packed(ids), after(ids))


def test_pre_transformers5_config_fields_are_understood():
    """Checkpoints on disk mostly predate `rope_parameters`: rope_theta / rope_scaling / rope_local_base_freq."""
    from nanoseek.model.dense import SLIDING, dense_config_from_hf

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1)
    llama31 = dense_config_from_hf({**base, "model_type": "llama", "num_hidden_layers": 2, "rope_theta": 500000.0,
                                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}})  # fmt: skip
    assert llama31.rope_theta == 500000.0 and llama31.rope_scaling["rope_type"] == "llama3"
    gemma3 = dense_config_from_hf({**base, "model_type": "gemma3_text", "num_hidden_layers": 12, "head_dim": 16,
                                   "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "sliding_window": 512,
                                   "sliding_window_pattern": 6,
                                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}})  # fmt: skip
    assert gemma3.rope_local_theta == 10000.0 and gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert [i for i, t in enumerate(gemma3.layer_types) if t != SLIDING] == [5, 11]
    assert gemma3.norm_offset == 1.0 and gemma3.qk_norm and gemma3.embed_scale and gemma3.tie_word_embeddings
    gemma2 = dense_config_from_hf({**base, "model_type": "gemma2", "num_hidden_layers": 4, "head_dim": 16,
                                   "query_pre_attn_scalar": 144, "attn_logit_softcapping": 50.0,
                                   "final_logit_softcapping": 30.0, "sliding_window": 4096})  # fmt: skip
    assert gemma2.layer_types == [SLIDING, "full_attention"] * 2 and gemma2.softmax_scale == 144**-0.5


def test_save_pretrained_round_trips_through_transformers(pair, tmp_path):
    """nanoseek's dense export (the inverse of load_dense) is what transformers and nanoseek.load read back."""
    _, ref, ours = pair
    save_pretrained(ours, tmp_path)
    assert dense_config_from_hf(json.loads((tmp_path / "config.json").read_text())) == ours.config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = _ids(2, 12)
    with torch.no_grad():
        assert (back.eval()(ids).logits - ref(ids).logits).abs().max().item() <= TOL
        assert torch.equal(nanoseek.load(tmp_path)(ids), ours(ids))


def test_packed_documents_equal_separate_rows(pair):
    """Three documents in one row (block-diagonal mask, positions restarting per document: what SFT packing
    feeds) give each document's logits as if it ran alone, sliding windows and soft-capping included."""
    _, _, ours = pair
    lengths = [7, 5, 9]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    row = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    pos = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    with torch.no_grad():
        packed = ours.logits(ours.forward_hidden(row, position_ids=pos, document_ids=doc_ids))
        alone = torch.cat([ours(d) for d in docs], dim=1)
    assert (packed - alone).abs().max().item() <= TOL
