"""`nanoseek info MODEL`: load a model and print its architecture, size and a one-token check."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="load a model (HF folder or .gguf) and print what it is")
    p.add_argument("model", help="path to a HF model folder or a .gguf file")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import nanoseek

    model = nanoseek.load(args.model, dtype=args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    print(f"model:      {args.model}")
    print(f"type:       {getattr(cfg, 'model_type', type(model).__name__)}")
    print(f"parameters: {n_params / 1e6:.2f}M")
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, dtype=torch.long))
    print(f"logits:     {tuple(logits.shape)} {logits.dtype}")
    return 0
