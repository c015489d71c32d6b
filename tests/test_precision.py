"""Mixed precision and padding: the router decides in fp32 under bf16 autocast, bf16 models with padded
batches give fp32's logits within bf16 rounding (no NaN from masked rows), padding never counts as expert
load, and loss terms with nothing to score are zero rather than NaN."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from deepseek_reference import randomize_nanoseek
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.loss import IGNORE_INDEX
from nanoseek.model.moe import DeepseekMoE, Router, sequence_balance_loss
from nanoseek.weights.hf_folder import save_pretrained

# bf16 keeps 8 significant bits: measured max |diff| against fp32 of 0.9% (DeepSeek) and 1.4% (Llama, Gemma 2)
# of the largest logit. A masking bug is O(1) or NaN.
BF16_RTOL = 0.04


def _ids(B: int, T: int, seed: int = 1, low: int = 0) -> torch.Tensor:
    return torch.randint(low, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _padded_mask(x: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding: the first queries have no real key at all
    mask[2, 12:] = 0  # right padding
    return mask


# ---- router ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, {"scoring_func": "softmax", "topk_method": "greedy"}], ids=["v3", "v2"])
def test_router_decides_in_fp32_under_bf16_autocast(variant):
    cfg = from_name("test-tiny", **variant)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, 0.0, 0.02)
    router.e_score_correction_bias.normal_(0.0, 0.1)
    x = torch.randn(2048, cfg.hidden_size)  # enough tokens for bf16 rounding to flip some near-ties
    weights, idx, scores = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights_ac, idx_ac, scores_ac = router(x)
    assert scores_ac.dtype == weights_ac.dtype == torch.float32
    assert torch.equal(idx_ac, idx) and torch.equal(weights_ac, weights) and torch.equal(scores_ac, scores)


# ---- masks in bf16 -----------------------------------------------------------------------------------------


def _compare_bf16_with_fp32(folder, x, mask):
    fp32, bf16 = nanoseek.load(folder), nanoseek.load(folder, dtype="bfloat16")
    with torch.no_grad():
        expected, got = fp32(x, attention_mask=mask), bf16(x, attention_mask=mask)
    assert got.dtype == torch.bfloat16
    assert not got.isnan().any(), "NaN in a bf16 padded batch"  # padding positions included
    real = mask.bool()
    diff = (got[real].float() - expected[real]).abs().max().item()
    assert diff <= BF16_RTOL * expected.abs().max().item(), diff


def test_deepseek_bf16_padded_batch_matches_fp32(tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny")).eval()
    randomize_nanoseek(model)
    save_pretrained(model, tmp_path)
    x = _ids(3, 16)
    _compare_bf16_with_fp32(tmp_path, x, _padded_mask(x))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_dense_bf16_padded_batch_matches_fp32(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:  # soft-capped attention: the mask is applied outside SDPA
        cfg = transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                        attn_logit_softcapping=2.0, final_logit_softcapping=5.0)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    x = _ids(3, 16, low=3)
    _compare_bf16_with_fp32(tmp_path, x, _padded_mask(x))


# ---- padding is not expert load --------------------------------------------------------------------------

PAD = 2
LENGTHS = [16, 11, 7]


def _moe_model() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=1)).train()
    randomize_nanoseek(model)
    return model


def _rows() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, next-token targets) of different lengths, every position with a target."""
    out = []
    for i, n in enumerate(LENGTHS):
        ids = _ids(1, n + 1, seed=10 + i, low=3)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _loads_and_balance(model, x, y, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    moes = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    for m in moes:
        m.tokens_per_expert.zero_()
    out = model.compute_loss(x, y, mtp_weight=0.3, balance_alpha=1.0, **kwargs)
    return [m.tokens_per_expert.clone() for m in moes], out.balance_loss.detach()


@pytest.mark.parametrize("how", ["ignored_targets", "attention_mask"])
def test_padding_is_not_expert_load_nor_balance_loss(how):
    """A right-padded batch gives the expert loads (which move the router bias) and the sequence-wise
    balance loss of its rows run one by one without padding."""
    model = _moe_model()
    rows = _rows()
    T = max(LENGTHS)
    x = torch.full((len(rows), T), PAD)
    y = torch.full((len(rows), T), IGNORE_INDEX)
    for b, (xi, yi) in enumerate(rows):
        x[b, : xi.shape[1]], y[b, : yi.shape[1]] = xi[0], yi[0]
    kwargs = {"attention_mask": (y != IGNORE_INDEX).long()} if how == "attention_mask" else {}
    loads, balance = _loads_and_balance(model, x, y, **kwargs)
    alone = [_loads_and_balance(model, xi, yi) for xi, yi in rows]
    expected_loads = [sum(row_loads[i] for row_loads, _ in alone) for i in range(len(loads))]
    expected_balance = torch.stack([bal for _, bal in alone]).mean()
    assert len(loads) == 3  # 2 MoE layers + the MTP block's
    for got, expected in zip(loads, expected_loads):
        assert torch.equal(got, expected)
    assert loads[0].sum() == sum(LENGTHS) * model.config.num_experts_per_tok
    torch.testing.assert_close(balance, expected_balance, rtol=1e-5, atol=0)


def test_sequence_balance_loss_leaves_out_padding_and_empty_rows():
    torch.manual_seed(0)
    scores = torch.rand(2, 5, 8)
    idx = scores.topk(2, dim=-1).indices
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    got = sequence_balance_loss(scores, idx, mask)
    assert torch.allclose(got, sequence_balance_loss(scores[:1, :3], idx[:1, :3]))


# ---- loss terms with nothing to score ---------------------------------------------------------------------


def test_mtp_depth_without_targets_is_zero_not_nan():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(from_name("test-tiny", num_nextn_predict_layers=3)).train()
    x = _ids(2, 3)
    y = torch.roll(x, -1, 1)  # 3 positions: depth 3 predicts targets[t+3], which no position has
    out = model.compute_loss(x, y, mtp_weight=0.3, balance_alpha=1e-4)
    assert out.mtp_losses[2].item() == 0.0
    assert all(torch.isfinite(t) for t in [out.loss, out.lm_loss, out.mtp_loss, out.balance_loss])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_nan_loss_names_its_term():
    from nanoseek.train.trainer import diverged_message

    msg = diverged_message(
        7, float("nan"), {"lm": 2.5, "mtp depth 1": 3.1, "mtp depth 2": float("nan"), "balance": 1.0}
    )
    assert msg.startswith("step 7: loss is nan (from mtp depth 2 = nan)")
    assert "lm" not in msg and "balance" not in msg


def test_trainer_names_the_term_that_went_nan(tmp_path, monkeypatch):
    from nanoseek.train import trainer as trainer_mod
    from test_trainer import run, tiny_cfg

    build = trainer_mod.build_model

    def build_with_a_broken_mtp_module(cfg, tok):
        model = build(cfg, tok)
        with torch.no_grad():
            model.mtp[0].eh_proj.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(trainer_mod, "build_model", build_with_a_broken_mtp_module)
    with pytest.raises(FloatingPointError, match=r"step 0: loss is nan \(from mtp depth 1 = nan") as err:
        run(tiny_cfg(tmp_path / "r", "max_steps=2", "ckpt_every=0"))
    assert "lm =" not in str(err.value)
