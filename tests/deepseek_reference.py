"""Test helpers: transformers' DeepseekV3 (the reference) built from a nanoseek config."""

from __future__ import annotations

import torch

from nanoseek.model.config import DeepseekV3Config


def hf_config(cfg: DeepseekV3Config):
    from transformers import DeepseekV3Config as HFConfig

    d = cfg.to_dict()
    d.pop("architectures", None)
    d.pop("model_type", None)
    return HFConfig(**d, attn_implementation="eager")


def random_hf_model(cfg: DeepseekV3Config, seed: int = 0):
    """transformers DeepseekV3ForCausalLM with random weights, random correction bias, fp32, eval."""
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # default init leaves norms at 1; randomize everything
            p.add_(torch.randn_like(p) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def randomize_nanoseek(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
