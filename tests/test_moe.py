"""DeepSeekMoE pieces: both expert backends equal a plain per-expert loop (values and gradients), the
aux-loss-free bias update moves load toward balance, and the sequence-wise balance loss is sane."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model import moe
from nanoseek.model.config import from_name
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM


def loop_reference(experts: moe.GroupedExperts, x, w, idx):
    out = torch.zeros_like(x)
    F = experts.f
    for e in range(experts.n_experts):
        tok, k = (idx == e).nonzero(as_tuple=True)
        h = x[tok] @ experts.gate_up_proj[e].t()
        y = (torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ experts.down_proj[e].t()
        out = out.index_add(0, tok, y * w[tok, k, None])
    return out


@pytest.mark.parametrize("backend", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("skewed", [False, True])
def test_expert_backends_match_loop(backend, skewed):
    torch.manual_seed(0)
    experts = moe.GroupedExperts(8, 32, 16, backend=backend)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.1)
    torch.nn.init.normal_(experts.down_proj, 0, 0.1)
    x = torch.randn(50, 32, requires_grad=True)
    logits = torch.randn(50, 8)
    if skewed:  # most tokens pick experts 0 and 1; some experts get nothing
        logits[:, :2] += 5
    idx = logits.topk(2, dim=-1).indices
    w = torch.rand(50, 2, requires_grad=True)
    got, ref = experts(x, w, idx), loop_reference(experts, x, w, idx)
    assert (got - ref).abs().max() < 1e-5
    g_got = torch.autograd.grad(got.square().sum(), [x, w, experts.gate_up_proj, experts.down_proj])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, w, experts.gate_up_proj, experts.down_proj])
    for a, b in zip(g_got, g_ref):
        assert (a - b).abs().max() < 1e-4


def test_experts_backend_is_set_per_model():
    cfg = from_name("test-tiny")
    a, b = DeepseekV3ForCausalLM(cfg), DeepseekV3ForCausalLM(cfg)
    assert moe.set_experts_backend(a, "padded_bmm") is a
    backends = lambda m: {e.backend for e in m.modules() if isinstance(e, moe.GroupedExperts)}
    assert backends(a) == {"padded_bmm"} and backends(b) == {"auto"}  # the other model is untouched
    with pytest.raises(ValueError, match="unknown experts backend 'fast'; choose one of auto, grouped_mm"):
        moe.set_experts_backend(a, "fast")
    assert backends(a) == {"padded_bmm"}


def test_router_bias_update_balances_load():
    cfg = from_name("test-tiny")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).train()
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.weight[0] += 0.5  # expert 0 is everyone's favourite
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    imbalance = []
    for _ in range(60):
        with torch.no_grad():
            model(x)
        stats = moe.update_router_bias(model, gamma=0.01)
        imbalance.append(moe.load_imbalance(stats))
    assert router.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down
    assert imbalance[-1] < imbalance[0]
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, moe.DeepseekMoE))
    assert router.e_score_correction_bias.grad is None


def test_bias_changes_selection_not_gates():
    cfg = from_name("test-tiny", n_group=1, topk_group=1)
    router = moe.Router(cfg)
    torch.nn.init.normal_(router.weight, 0, 0.5)
    x = torch.randn(10, cfg.hidden_size)
    w0, idx0, scores = router(x)
    router.e_score_correction_bias[idx0[0, 0]] = -10.0  # forbid token 0's first choice
    w1, idx1, _ = router(x)
    assert idx0[0, 0] not in idx1[0]
    # Gates use the unbiased sigmoid scores of the chosen experts, normalized, times the scaling factor.
    expected = scores[0, idx1[0]] / scores[0, idx1[0]].sum() * cfg.routed_scaling_factor
    assert torch.allclose(w1[0], expected)


def test_balance_loss_is_minimal_when_uniform():
    B, T, E, K = 2, 16, 8, 2
    uniform_scores = torch.full((B, T, E), 0.5)
    idx = torch.arange(T * K).view(1, T, K).expand(B, T, K) % E
    balanced = moe.sequence_balance_loss(uniform_scores, idx)
    # Every token picks experts 0 and 1, which also hold most of the score mass: penalized.
    skewed_scores = torch.full((B, T, E), 0.1)
    skewed_scores[..., 0] = 0.9
    always_01 = torch.tensor([0, 1]).expand(B, T, K)
    skewed = moe.sequence_balance_loss(skewed_scores, always_01)
    assert torch.isclose(balanced, torch.tensor(1.0)) and torch.isclose(skewed, torch.tensor(2.5))


def test_compute_loss_with_mtp_and_balance_backprops():
    cfg = from_name("test-tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.roll(x, -1, 1)
    targets[:, -1] = -100
    out = model.compute_loss(x, targets, mtp_weight=0.3, balance_alpha=1e-4)
    assert len(out.mtp_losses) == 2 and out.balance_loss is not None
    expected = out.lm_loss + 0.3 * out.mtp_loss + 1e-4 * out.balance_loss
    assert torch.isclose(out.loss, expected)
    # the parts are the losses they claim to be: the main head's cross-entropy, the mean over MTP depths
    with torch.no_grad():
        lm_ref = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss.detach(), lm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, torch.stack(out.mtp_losses).mean())
    out.loss.backward()
    assert model.mtp[1].eh_proj.weight.grad is not None and model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_fused_projection_weights_are_reused_at_inference_and_follow_updates():
    from nanoseek.model.moe import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(8, 16)
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = mlp._fused_gate_up(mlp.gate_proj, mlp.up_proj)
        assert mlp._fused_gate_up(mlp.gate_proj, mlp.up_proj) is first  # made once, reused
        mlp.up_proj.weight.mul_(2)  # an optimizer step: the cache must notice
        y = mlp(x)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(y, ref)
    mlp(x).sum().backward()  # training: gradients reach the separate parameters
    assert mlp.gate_proj.weight.grad is not None and mlp.up_proj.weight.grad is not None
