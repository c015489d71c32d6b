"""The one place that applies compilation and data parallelism to a model (torchtitan's order:
compile blocks, then shard). Model code never sees any of it.

    step_module = parallelize(model, mode="ddp" | "fsdp" | "none", info=dist_info, compile=False)
    out = step_module(input_ids, targets, mtp_weight=0.3)     # dict of loss tensors (training)
    logits = step_module(input_ids, attention_mask=..., position_ids=..., cache=...)   # inference
    out = step_module(call=lambda model: my_losses(model, batch))   # any other computation (GRPO's)

Both DDP and FSDP2 hook a module's *forward*; `compute_loss` is a method of its own, so training goes
through `LossModule`, whose forward dispatches to `compute_loss` (with targets) or to the plain forward
(without), or runs `call(model)` for a computation of its own (GRPO: the policy's log-probs and the MTP
module's loss in one forward, so DDP sees every trained parameter used once per backward). Under FSDP2
evaluation must go through this module too: that is what gathers the shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nanoseek.parallel.distributed import DistInfo

MODES = ("none", "ddp", "fsdp")


class LossModule(nn.Module):
    """forward(input_ids, targets) -> {"lm": mean CE, "mtp": [D] per-depth means | None, "balance": ...};
    forward(input_ids, attention_mask=, position_ids=, cache=) without targets -> logits;
    forward(call=fn) -> fn(model), whatever it computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        logits_index: torch.Tensor | None = None,
        mtp_weight: float = 0.0,
        balance_alpha: float = 0.0,
        document_ids: torch.Tensor | None = None,
        call: Callable[[nn.Module], Any] | None = None,
    ):
        if call is not None:  # inside the wrapper's forward, so DDP/FSDP2 hooks run around it
            return call(self.model)
        # Packed training rows pass document_ids (model/packing.py) and per-document position_ids.
        if targets is None:
            return self.model(
                input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                logits_index=logits_index,
            )  # fmt: skip
        packed = {} if document_ids is None else {"position_ids": position_ids, "document_ids": document_ids}
        out = self.model.compute_loss(
            input_ids, targets, mtp_weight=mtp_weight, balance_alpha=balance_alpha, attention_mask=attention_mask,
            **packed,
        )  # fmt: skip
        # Plain tensors in a dict: DDP finds every output tensor in it.
        mtp = torch.stack(out.mtp_losses) if out.mtp_losses else None
        return {"lm": out.lm_loss, "mtp": mtp, "balance": out.balance_loss}

    @property
    def config(self):
        """The wrapped model's config (the inference engine reads the cache layout from it)."""
        return self.model.config


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, the unit of compilation and of FSDP sharding: the decoder layers and each MTP
    module's block. (An MTP module's own norms and projection stay with the root: compute_loss uses its output
    norm outside the module's forward, where a separately sharded weight would still be in shards.)"""
    out = list(model.model.layers)
    out.extend(m.block for m in getattr(model, "mtp", []))
    return out


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block's attention and dense MLP in place. The routed MoE stays eager: its
    data-dependent token counts and grouped matmul do not trace (on CPU the fake-tensor check of
    torch._grouped_mm even demands bf16), and it is already a few large matmuls."""
    from nanoseek.model.moe import DeepseekMoE

    for block in blocks(model):
        block.self_attn.compile()
        if isinstance(block.mlp, DeepseekMoE):
            if block.mlp.shared_experts is not None:
                block.mlp.shared_experts.compile()
        else:
            block.mlp.compile()


def parallelize(model: nn.Module, mode: str = "none", *, info: DistInfo | None = None, compile: bool = False):
    """Wrap `model` (already on its device) for training; returns a LossModule (maybe DDP/FSDP-wrapped).

    mode "none" needs a single process; "ddp" replicates the model and averages gradients; "fsdp" shards
    each block's parameters, gradients and optimizer state over the ranks (FSDP2 `fully_shard`).
    With compile, every block is compiled separately (small graphs, shared by identical layers).
    """
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(MODES)}, got {mode!r}")
    info = info or DistInfo()
    if mode == "none" and info.distributed:
        raise ValueError(f"{info.world_size} processes but parallel mode 'none'; use ddp or fsdp")
    if compile:
        compile_blocks(model)
    wrapped: nn.Module = LossModule(model)
    if mode == "ddp" and info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: the MoE's per-rank token counts are buffers and must not be overwritten
        # by rank 0's; the router biases stay equal on all ranks because their update uses summed loads.
        wrapped = DDP(
            wrapped,
            device_ids=[info.device] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
    elif mode == "fsdp" and info.distributed:
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        fully_shard(wrapped)  # the root: embeddings, final norm, head, MTP projections
    return wrapped


def unwrap(module: nn.Module) -> nn.Module:
    """The DeepseekV3ForCausalLM inside whatever parallelize() returned."""
    if hasattr(module, "module"):  # DDP
        module = module.module
    return module.model if isinstance(module, LossModule) else module


def no_grad_sync(module: nn.Module, skip: bool):
    """Context for one micro-batch: skip the gradient all-reduce / reduce-scatter unless it is the last one
    of the optimizer step (gradient accumulation)."""
    import contextlib

    if not skip:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def _fsdp():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return _fsdp()
    return contextlib.nullcontext()
