"""DeepSeekMoE: sigmoid router with group-limited top-k, grouped routed experts, shared experts,
and the aux-loss-free load balancing rule.

Shapes: N tokens (B*T flattened), E routed experts, K experts per token, d hidden, F expert width.

Speed: routing is fully vectorized; tokens are stable-sorted by expert so each expert's rows are
contiguous, and all experts run in one grouped matmul (`torch._grouped_mm` with offsets) — no Python
loop over experts in forward or backward. Where the build's grouped matmul does not support the
device/dtype, a padded batched matmul does the same job.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import DeepseekV3Config
from nanoseek.model.fused import FusedWeight


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP with HF names (gate_proj, up_proj, down_proj); also the shared experts."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self._fused_gate_up = FusedWeight()
        self.gate_up_proj: nn.Module | None = None  # set by nanoseek.quant.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(type(self.gate_up_proj), "returns_parts", False):  # LoRA: (gate, up) in one node (model/lora.py)
            gate, up = self.gate_up_proj(x)
            return self.down_proj(F.silu(gate) * up)
        if self.gate_up_proj is not None:  # one (possibly quantized) module in place of gate_proj and up_proj
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if type(self.gate_proj) is not nn.Linear or type(self.up_proj) is not nn.Linear:  # e.g. LoRA layers
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # One matmul for gate and up (a bigger GEMM is more efficient than two); names stay HF's.
        gate, up = F.linear(x, self._fused_gate_up(self.gate_proj, self.up_proj)).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Sigmoid scores; selection uses score + correction bias, group-limited; gates use unbiased scores."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Never trained by gradients: moved by `update_router_bias` from observed expert loads.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The router runs in fp32 whatever the model dtype, and under autocast too (which would otherwise
        # run this matmul in bf16), as DeepSeek's own code does: near-ties decide expert choice.
        with torch.autocast(x_ND.device.type, enabled=False):
            return self._route(x_ND.float())

    def _route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_NE = F.linear(x_ND, self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.scoring_func == "sigmoid" else logits_NE.softmax(-1)
        with torch.no_grad():
            choice_NE = scores_NE
            if self.topk_method == "noaux_tc":
                choice_NE = scores_NE + self.e_score_correction_bias
            if self.n_group > 1 and self.topk_method != "greedy":
                grouped = choice_NE.view(-1, self.n_group, self.n_experts // self.n_group)
                if self.topk_method == "noaux_tc":  # V3: a group's score is the sum of its top-2
                    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
                else:  # V2 group_limited_greedy: its best expert
                    group_scores = grouped.amax(-1)
                keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)
                choice_NE = choice_NE.masked_fill(~expert_mask, float("-inf"))
            topk_idx_NK = choice_NE.topk(self.top_k, dim=-1, sorted=False).indices
        weights_NK = scores_NE.gather(1, topk_idx_NK)  # gates use the unbiased scores
        if self.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return weights_NK * self.scaling, topk_idx_NK, scores_NE


# How routed experts run: "grouped_mm" (torch._grouped_mm over expert-sorted rows, combined with index_add_),
# "padded_bmm" (one bmm over per-expert slot blocks, dispatched and combined with gathers), or "auto"
# (grouped_mm where the kernel is native: CUDA bf16 on sm90+, and on CPU, where `nanoseek bench moe-step`
# measures both; padded_bmm elsewhere). Both compute the same function.
EXPERTS_BACKENDS = ("auto", "grouped_mm", "padded_bmm")


def experts_outside_graph():
    """GroupedExperts' computation under `torch.compiler.disable`: always eager, also inside a compiled caller
    (the token counts per expert are data-dependent and, on CPU, the fake-tensor check of torch._grouped_mm
    demands bf16). Built on first use rather than by decorating the method, because `torch.compiler.disable`
    imports torch._dynamo, and importing this module (every model load) would then cost ~70 MB of RSS and
    ~1.7 s for processes that never compile. Call it before compiling a model with experts: built while
    tracing, it costs an extra graph break once."""
    if GroupedExperts.eager_forward is None:
        GroupedExperts.eager_forward = torch.compiler.disable(GroupedExperts._forward)
    return GroupedExperts.eager_forward


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors (transformers v5 layout: gate_up_proj [E, 2F, d],
    down_proj [E, d, F]); HF per-expert names are produced by the state-dict adapter.

    backend: one of EXPERTS_BACKENDS, per module (set_experts_backend changes it on a whole model)."""

    eager_forward = None  # what a compiled caller runs: see experts_outside_graph

    def __init__(self, n_experts: int, d: int, f: int, backend: str = "auto"):
        super().__init__()
        self.n_experts, self.f = n_experts, f
        self.backend = _checked_backend(backend)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d, f))

    def forward(
        self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor, counts_E: torch.Tensor | None = None
    ) -> torch.Tensor:
        """counts_E: rows per expert, if the caller already has them (bincount of idx_NK)."""
        if torch.compiler.is_compiling():  # traced by a compiled caller (the engine's compiled decode)
            return experts_outside_graph()(self, x_ND, weights_NK, idx_NK, counts_E)
        return self._forward(x_ND, weights_NK, idx_NK, counts_E)

    def _forward(self, x_ND, weights_NK, idx_NK, counts_E):
        N, K = idx_NK.shape
        flat_idx = idx_NK.reshape(-1)
        order = flat_idx.argsort(stable=True)  # (token, k) rows sorted by expert
        if counts_E is None:
            counts_E = torch.bincount(flat_idx, minlength=self.n_experts)
        backend = self.backend if self.backend != "auto" else _auto_backend(x_ND)
        if backend == "padded_bmm":
            capacity = int(counts_E.max())
            # Padding wastes compute when routing is very unbalanced; then the grouped matmul is better.
            if capacity * self.n_experts <= 2 * N * K or not hasattr(torch, "_grouped_mm"):
                return self._padded_bmm(x_ND, weights_NK.reshape(-1), flat_idx, order, counts_E, capacity)
        token_of_row = order // K
        offs = counts_E.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_ND.index_select(0, token_of_row), self.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        y = y * weights_NK.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of_row, y)

    def _padded_bmm(self, x_ND, weights_R, flat_idx, order, counts_E, capacity: int) -> torch.Tensor:
        """Experts as one bmm over [E, C, d] slot blocks (C = the busiest expert's token count).

        Slots and (token, k) pairs are in one-to-one correspondence (plus padding slots), so both the
        dispatch and the combine are row gathers whose backward is again a gather (see _Dispatch and
        _Combine): no scatter-add anywhere, which is what makes this fast on CPU.
        """
        N, D = x_ND.shape
        E, K = self.n_experts, flat_idx.numel() // N
        expert_sorted = flat_idx[order]
        starts = counts_E.cumsum(0) - counts_E
        pos_sorted = expert_sorted * capacity + (
            torch.arange(order.numel(), device=order.device) - starts[expert_sorted]
        )
        pos_R = torch.empty_like(pos_sorted).index_copy_(0, order, pos_sorted)  # slot of each (token, k) pair
        slot_pair = torch.full((E * capacity,), N * K, dtype=torch.long, device=x_ND.device)
        slot_pair[pos_sorted] = order  # pair of each slot; N*K marks padding
        buf = _Dispatch.apply(x_ND, torch.div(slot_pair, K, rounding_mode="floor"), pos_R, K)
        gate, up = torch.bmm(buf.view(E, capacity, D), self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2)).view(E * capacity, D)
        y_NKD = _Combine.apply(y, pos_R, slot_pair, N, K)
        return torch.bmm(weights_R.view(N, 1, K).to(y.dtype), y_NKD).squeeze(1)


class _Dispatch(torch.autograd.Function):
    """buf[s] = x[token(s)] (a zero row for padding slots); backward sums each token's K slot grads."""

    @staticmethod
    def forward(ctx, x_ND, slot_token, pos_R, K):
        ctx.save_for_backward(pos_R)
        ctx.K = K
        x_pad = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])
        return x_pad.index_select(0, slot_token)

    @staticmethod
    def backward(ctx, grad_buf):
        (pos_R,) = ctx.saved_tensors
        grad_x = grad_buf.index_select(0, pos_R).view(-1, ctx.K, grad_buf.shape[-1]).sum(1)
        return grad_x, None, None, None


class _Combine(torch.autograd.Function):
    """y_NKD[n, k] = y[slot of pair (n, k)]; backward routes each pair's grad back to its slot."""

    @staticmethod
    def forward(ctx, y_SD, pos_R, slot_pair, N, K):
        ctx.save_for_backward(slot_pair)
        return y_SD.index_select(0, pos_R).view(N, K, y_SD.shape[-1])

    @staticmethod
    def backward(ctx, grad_NKD):
        (slot_pair,) = ctx.saved_tensors
        D = grad_NKD.shape[-1]
        grad_pad = torch.cat([grad_NKD.reshape(-1, D), grad_NKD.new_zeros(1, D)])
        return grad_pad.index_select(0, slot_pair), None, None, None, None


def _checked_backend(backend: str) -> str:
    if backend not in EXPERTS_BACKENDS:
        raise ValueError(f"unknown experts backend {backend!r}; choose one of {', '.join(EXPERTS_BACKENDS)}")
    return backend


def set_experts_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run every GroupedExperts of `model` with `backend` (see EXPERTS_BACKENDS); returns the model."""
    backend = _checked_backend(backend)
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.backend = backend
    return model


def _auto_backend(x: torch.Tensor) -> str:
    if not hasattr(torch, "_grouped_mm"):
        return "padded_bmm"
    if x.device.type == "cpu":
        return "grouped_mm"
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9:
        return "grouped_mm"
    return "padded_bmm"


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
            if cfg.n_shared_experts > 0
            else None
        )
        # Tokens routed to each expert since the last bias update (the trainer reads and resets it).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x_BTD: torch.Tensor, aux=None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """aux: an object with `append` (deepseek_v3.AuxLosses) collecting the sequence balance loss, or None.
        token_mask [B,T]: the real tokens (None: all). Padding is routed like any token (its output is never
        used) but counts neither toward expert load, which moves the router bias, nor toward the balance loss.
        """
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, idx_NK, scores_NE = self.gate(x_ND)
        counts_E = torch.bincount(idx_NK.reshape(-1), minlength=self.gate.n_experts)
        if self.training:
            if token_mask is None:
                self.tokens_per_expert += counts_E.detach()
            else:  # weighted count: no data-dependent shapes, so no device sync
                real_NK = token_mask.reshape(-1, 1).expand_as(idx_NK).to(self.tokens_per_expert.dtype)
                self.tokens_per_expert += torch.bincount(
                    idx_NK.reshape(-1), weights=real_NK.reshape(-1), minlength=self.gate.n_experts
                ).to(self.tokens_per_expert.dtype)
        if aux is not None:
            aux.append(sequence_balance_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1), token_mask))
        out = self.experts(x_ND, weights_NK, idx_NK, counts_E).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BTD)
        return out


def sequence_balance_loss(
    scores_BTE: torch.Tensor, idx_BTK: torch.Tensor, token_mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, without its alpha:
    sum_i f_i * P_i per sequence, averaged over sequences, where f_i = E/(K*T) * (#tokens choosing i)
    and P_i = mean_t of the normalized scores s_i / sum_j s_j.

    With token_mask, T counts a sequence's real tokens only and padding is left out of f and P; a sequence
    with no real token is left out of the average."""
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    real_BT = (
        torch.ones(B, T, device=scores_BTE.device)
        if token_mask_BT is None
        else token_mask_BT.to(device=scores_BTE.device, dtype=torch.float32)
    )
    n_real_B = real_BT.sum(1)
    with torch.no_grad():
        counts = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, idx_BTK.reshape(B, -1), real_BT[:, :, None].expand(B, T, K).reshape(B, -1)
        )
        f_BE = counts * (E / K) / n_real_B.clamp(min=1)[:, None]
    normalized = scores_BTE / scores_BTE.sum(-1, keepdim=True)
    p_BE = (normalized * real_BT[:, :, None]).sum(1) / n_real_B.clamp(min=1)[:, None]
    per_row = (f_BE * p_BE).sum(-1)
    has_tokens = (n_real_B > 0).to(per_row.dtype)
    return (per_row * has_tokens).sum() / has_tokens.sum().clamp(min=1)


@torch.no_grad()
def update_router_bias(model: nn.Module, gamma: float = 1e-3, process_group=None) -> dict[str, list[float]]:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): bias_i += gamma * sign(mean_load - load_i).

    Call once per optimizer step (after accumulating micro-batches). Loads are summed across data-parallel
    ranks first so every rank applies the same update. Returns each MoE layer's load fractions for logging.
    """
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, DeepseekMoE)]
    if not moes:
        return {}
    loads = torch.stack([m.tokens_per_expert for _, m in moes])  # [L, E]
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(loads, group=process_group)
    stats = {}
    for (name, moe), load in zip(moes, loads):
        if load.sum() > 0:
            bias = moe.gate.e_score_correction_bias
            bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
            stats[name] = (load / load.sum()).tolist()
        moe.tokens_per_expert.zero_()
    return stats


def load_imbalance(stats: dict[str, list[float]]) -> float:
    """Max over layers of (max expert load / mean load): 1.0 is perfectly balanced."""
    worst = 1.0
    for fractions in stats.values():
        if fractions:
            worst = max(worst, max(fractions) * len(fractions))
    return worst
