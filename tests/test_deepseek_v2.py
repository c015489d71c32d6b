"""DeepSeek-V2 / V2-Lite folders (model_type deepseek_v2: softmax router, greedy or group-limited
selection, no correction bias, complex-number rope) load into the same model and match transformers."""

from __future__ import annotations

import pytest
import torch

import nanoseek

TOL = 2e-6  # measured max |diff| 3.6e-7 (as DeepSeek-V3's, see test_deepseek_v3.py)
V2_TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=2, max_position_embeddings=128, routed_scaling_factor=1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "variant",
    [
        {"q_lora_rank": None, "topk_method": "greedy"},  # V2-Lite
        {
            "q_lora_rank": 32,
            "topk_method": "group_limited_greedy",
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 16.0,
        },
    ],  # fmt: skip
    ids=["v2-lite", "v2-group-limited"],
)
def test_deepseek_v2_matches_transformers(tmp_path, variant):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    ref = DeepseekV2ForCausalLM(DeepseekV2Config(**{**V2_TINY, **variant}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    assert ours.config.scoring_func == "softmax" and ours.config.topk_method == variant["topk_method"]
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() <= TOL
