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

from nanoseek.config import DeepseekV3Config


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP with HF names (gate_proj, up_proj, down_proj); also the shared experts."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        # The router runs in fp32 whatever the model dtype: ties and near-ties decide expert choice.
        logits_NE = F.linear(x_ND.float(), self.weight.float())
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


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as 3D tensors (transformers v5 layout: gate_up_proj [E, 2F, d],
    down_proj [E, d, F]); HF per-expert names are produced by the state-dict adapter."""

    def __init__(self, n_experts: int, d: int, f: int):
        super().__init__()
        self.n_experts, self.f = n_experts, f
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d, f))

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        N, K = idx_NK.shape
        flat_idx = idx_NK.reshape(-1)
        order = flat_idx.argsort(stable=True)  # rows sorted by expert
        token_of_row = order // K
        counts_E = torch.bincount(flat_idx, minlength=self.n_experts)
        x_sorted = x_ND[token_of_row]
        if _grouped_mm_ok(x_ND):
            offs = counts_E.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            y = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        else:
            y = self._padded_bmm(x_sorted, flat_idx[order], counts_E)
        y = y * weights_NK.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_of_row, y)

    def _padded_bmm(self, x_sorted: torch.Tensor, expert_of_row: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Each expert's rows go into its own slot block [E, C, d]; one bmm per projection.
        capacity = int(counts_E.max())
        starts = counts_E.cumsum(0) - counts_E
        slot = torch.arange(x_sorted.shape[0], device=x_sorted.device) - starts[expert_of_row]
        buf = x_sorted.new_zeros(self.n_experts, capacity, x_sorted.shape[-1])
        buf = buf.index_put((expert_of_row, slot), x_sorted)
        gate, up = torch.bmm(buf, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.down_proj.transpose(1, 2))
        return out[expert_of_row, slot]


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":  # the CUDA kernel wants bf16 on Hopper+ (sm90)
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


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

    def forward(self, x_BTD: torch.Tensor, aux: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, idx_NK, scores_NE = self.gate(x_ND)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx_NK.reshape(-1), minlength=self.gate.n_experts)
        if aux is not None:
            aux.append(sequence_balance_loss(scores_NE.view(B, T, -1), idx_NK.view(B, T, -1)))
        out = self.experts(x_ND, weights_NK, idx_NK).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BTD)
        return out


def sequence_balance_loss(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, without its alpha:
    sum_i f_i * P_i per sequence, averaged over sequences, where f_i = E/(K*T) * (#tokens choosing i)
    and P_i = mean_t of the normalized scores s_i / sum_j s_j."""
    B, T, E = scores_BTE.shape
    K = idx_BTK.shape[-1]
    with torch.no_grad():
        counts = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, idx_BTK.reshape(B, -1), torch.ones(B, T * K, device=scores_BTE.device)
        )
        f_BE = counts * (E / (K * T))
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


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
