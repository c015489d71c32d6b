"""RMSNorm, computed in fp32 like the reference implementations (matters for bf16 equivalence)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def inference_kernel_applies(x: torch.Tensor) -> bool:
    """Whether a module's inference kernel (see RMSNorm.inference_kernel) may compute on x: fp32 on CPU, no
    gradient wanted, not being traced by torch.compile."""
    inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    return inference and x.dtype == torch.float32 and x.device.type == "cpu"


class RMSNorm(nn.Module):
    # A fused kernel with rms_norm's signature (x, weight, eps, offset), set by the inference engine
    # (engine/fused_ops.py; model/ does not import the engine) and used only where no gradient is wanted, on fp32
    # CPU tensors, outside torch.compile (whose own fusion of the norm with its neighbours is better).
    inference_kernel = None

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # Gemma stores w and scales by (1 + w); Llama/DeepSeek scale by w (offset 0).
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_kernel is not None and inference_kernel_applies(x):
            return self.inference_kernel(x, self.weight, self.eps, self.offset)
        if x.dtype == torch.float32 and self.offset == 0.0:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)
