"""Test helper: a scripted language model, a real nn.Module that the real engine runs like any other.

It stores each token id in the paged KV cache (as its one-layer "key"), reads back the whole sequence at every
position it is asked for, and puts all the probability on the token `policy(sequence)` returns. So a test can
make a tiny model behave exactly as a conversation needs (call a tool, then answer from the tool's result),
through the engine's batching, prefix cache and sampling, and the server's real routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ScriptedConfig:
    vocab_size: int
    eos_token_id: int
    max_position_embeddings: int = 4096
    num_hidden_layers: int = 1
    num_key_value_heads: int = 1
    head_dim: int = 1
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=lambda: ["full_attention"])


class ScriptedModel(nn.Module):
    def __init__(self, config: ScriptedConfig, policy: Callable[[Sequence[int]], int]):
        super().__init__()
        self.config, self.policy = config, policy
        self.anchor = nn.Parameter(torch.zeros(1))  # fp32: the engine's cache takes the first parameter's dtype

    def forward(self, ids: torch.Tensor, cache, logits_index: torch.Tensor, return_hidden: bool = False):
        B, T = ids.shape
        keys = ids[..., None, None].to(self.anchor.dtype)  # [B, T, K=1, D=1]: ids < 2**24 are exact in fp32
        history, _ = cache.update(0, k=keys, v=torch.zeros_like(keys))
        logits = torch.full((B, logits_index.shape[1], self.config.vocab_size), -30.0)
        for b in range(B):
            for j, t in enumerate(logits_index[b].tolist()):
                position = int(cache.positions[b, t])
                sequence = history[b, : position + 1, 0, 0].long().tolist()
                logits[b, j, self.policy(sequence)] = 30.0
        return (logits, None) if return_hidden else logits


def script_policy(tokenizer, header: str, reply: Callable[[str], str]) -> Callable[[Sequence[int]], int]:
    """A policy that writes `reply(prompt_text)` after the last `header` (e.g. "<|im_start|>assistant\\n") and
    then the tokenizer's first stop id; anything else (inside a prompt) gets the stop id too."""
    header_ids = tokenizer.encode(header, add_special_tokens=False)
    stop = tokenizer.stop_token_ids[0]
    n = len(header_ids)

    def policy(sequence: Sequence[int]) -> int:
        starts = [i for i in range(len(sequence) - n, -1, -1) if list(sequence[i : i + n]) == header_ids]
        if not starts:
            return stop
        prompt, written = sequence[: starts[0] + n], list(sequence[starts[0] + n :])
        target = tokenizer.encode(reply(tokenizer.decode(prompt, skip_special_tokens=False)), add_special_tokens=False)
        if written != target[: len(written)] or len(written) >= len(target):
            return stop
        return target[len(written)]

    return policy
