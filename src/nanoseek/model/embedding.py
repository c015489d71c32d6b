"""The token embedding table, built without initializing it when the model is built on the meta device."""

from __future__ import annotations

import torch
from torch import nn


def token_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """nn.Embedding(vocab_size, hidden_size), initialized N(0, 1) as torch does, except on the meta device
    (a model built to have its weights loaded), where it is left uninitialized: there torch's normal_ runs a
    Python decomposition that imports torch._dynamo, ~70 MB of RSS and ~1.7 s for a process that never
    compiles (measured loading SmolLM2: RSS 515 -> 445 MB)."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))
    return nn.Embedding(vocab_size, hidden_size)
