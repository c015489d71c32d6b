"""Several linears' weights as one matrix, so their projections run as one bigger (faster) matmul while the
parameters keep transformers' names and shapes.

Training concatenates on every call (gradients must reach the separate parameters). At inference the
concatenation is made once and reused until a weight changes (a new tensor or an in-place update bumps
`data_ptr` / `_version`), so a decode step does not copy the weights it is about to read.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedWeight:
    """Callable returning torch.cat of the given linears' weights (dim 0)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None

    def __call__(self, *linears: nn.Linear) -> torch.Tensor:
        weights = [m.weight for m in linears]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.cat(weights)
        # a concatenation made under inference_mode (e.g. a frozen base's weights during GRPO's rollouts) cannot
        # be saved for a later backward through other parameters (LoRA adapters): not reused outside that mode
        inference = torch.is_inference_mode_enabled()
        key = (inference, *((w.data_ptr(), w._version, w.dtype, w.device) for w in weights))
        if key != self._key:
            self._weight, self._key = torch.cat(weights).detach(), key
        return self._weight

    def clear(self) -> None:
        self._key = self._weight = None


def clear_fused_weights(model: nn.Module) -> None:
    """Drop every cached concatenation (e.g. after evaluating a sharded model, whose gathered weights
    must not stay alive in the cache)."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, FusedWeight):
                value.clear()
