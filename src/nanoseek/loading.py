"""`nanoseek.load(path)`: one entry point for every model format and architecture.

A HF folder is dispatched on `config.json`'s `model_type` through `ARCHITECTURES`; a `.gguf` file goes
through the GGUF reader. Each entry names a loader `(folder, config_dict, dtype, device, quant) -> nn.Module`
(weights/hf_folder.py), so adding a family touches this table and its loader only.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from nanoseek.memory import return_freed_memory
from nanoseek.weights.safetensors_io import WeightsError, read_config_json

# model_type -> "module:function" building the model from a HF folder (imported lazily).
ARCHITECTURES: dict[str, str] = {
    "deepseek_v3": "nanoseek.weights.hf_folder:load_deepseek_v3",
    "deepseek_v2": "nanoseek.weights.hf_folder:load_deepseek_v3",
    **{
        t: "nanoseek.weights.hf_folder:load_dense"
        for t in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "gemma3_text")
    },
}


def _resolve(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


QUANT_CHOICES = ("auto", "none", "int8", "int4", "fp16")


def resolve_quant(choice: str | None, path: str | os.PathLike, device: str | torch.device | None) -> str:
    """The weights' run format ("none" | "int8" | "int4" | "fp16") for `quant=choice`: what `nanoseek.load(...,
    quant="auto")` and the command line's `--quant auto` (generate, chat, eval, serve) both pick.

    "auto", on the CPU, for a quantized GGUF file: int4 when the file's layers have 4-bit weights (Q4_0, Q4_1,
    Q4_K) and nanoseek's 4-bit kernel runs here: those run from the file's own blocks, and weights the file
    keeps in more bits (a Q4_K_M file's Q6_K and Q8_0 tensors) as int8 (weights/hf_folder._pack_linears). Else
    int8 (4-8 bit weights kept close, ~3x faster than fp32). Anything else (a HF folder, an F32/F16 GGUF, a GPU)
    runs unquantized. On SmolLM2 Q4_1 (benchmarks/RESULTS.md, Decode, 07:55 run), int4 against int8: one stream
    1.20-1.38x as fast, prefill 0.98-1.16x, 64 streams 1.02-1.08x, eager and compiled; and its logits stay
    closer to the file's model: its linears, and the lm_head and wider tensors it runs as Q8_0 blocks, round
    activations to int8 per block of 32 as llama.cpp does, while int8 rounds each row with one scale, which
    models with large activations (Gemma) lose most to (`nanoseek bench quality`, benchmarks/RESULTS.md "Quality
    at equal bits"). A format named explicitly is returned as is (packed formats on the CPU only)."""
    choice = "none" if choice is None else choice
    if choice not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {choice!r}; use one of {', '.join(QUANT_CHOICES)}")
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


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quant: str | None = None,
    lora: dict[str, str | os.PathLike] | None = None,
) -> torch.nn.Module:
    """Load a model from a HF folder (config.json + safetensors) or a .gguf file, ready for inference.

    Calling the returned module on a LongTensor [B, T] gives logits [B, T, vocab].
    `quant` ("int8" | "int4" | "fp16", CPU inference): the projections run packed (nanoseek.quant); dense models
    and GGUF files are packed while loading, without an fp32 copy of the whole model. quant="auto" picks what
    the command line's `--quant auto` picks (resolve_quant: int4 or int8 for a quantized GGUF file on the CPU,
    unquantized otherwise); None or "none" (the default) loads unquantized.
    `lora` {name: PEFT adapter folder}: LoRA adapters attached by name (load_lora), which engine requests pick
    with SamplingParams(lora=name) and plain forwards with `model.lora_adapters.rows([name, None, ...])`.
    Raises FileNotFoundError / ValueError naming the file and the problem.
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    quant = None if quant is None else resolve_quant(quant, path, device)  # "auto" -> what the CLI picks
    quant = None if quant == "none" else quant
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path}: not a model folder or a .gguf file")
        model = _resolve("nanoseek.weights.gguf:load_gguf_model")(path, dtype=dtype, device=device, quant=quant)
    else:
        config = read_config_json(path)
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise WeightsError(f"{path / 'config.json'}: unsupported model_type {model_type!r}; supported: {known}")
        model = _resolve(ARCHITECTURES[model_type])(path, config, dtype=dtype, device=device, quant=quant)
    # the readers' buffers and the dequantization temporaries are freed by now but stay in the process
    # (measured on SmolLM2 int8: RSS after loading ~605 -> 555 MB)
    return_freed_memory()
    if lora:
        load_lora(model, lora)
    return model.eval()


def load_lora(model: torch.nn.Module, adapters: dict[str, str | os.PathLike]):
    """Attach PEFT LoRA adapter folders ({name: folder}, as peft's save_pretrained writes them) to a loaded dense
    model (after quantizing, if at all): engine/lora.py serves them, each row of a batch with its own. An adapter
    whose modules or shapes do not fit the model is refused (ValueError naming it) before any is attached.
    Returns the model's LoraAdapters."""
    from nanoseek.engine.lora import attach_lora
    from nanoseek.weights.peft_lora import read_peft_adapter

    read = {name: read_peft_adapter(path) for name, path in adapters.items()}
    updates = {name: {m: (u.a, u.b, u.scale) for m, u in w.modules.items()} for name, w in read.items()}
    return attach_lora(model, updates, {name: str(path) for name, path in adapters.items()})


def save(model: torch.nn.Module, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None) -> None:
    """Write a model `nanoseek.load` returned (or one nanoseek trained) as a HF folder at `path`: config.json,
    safetensors, generation_config.json, in the layout transformers, vLLM and SGLang read (a DeepSeek-V3 model's
    MTP layers included, as DeepSeek's checkpoints store them). `nanoseek.load(path)` reads it back.
    `dtype` ("bfloat16", torch.float16, ...) converts the stored weights; None keeps the model's.

    A DeepSeek-V3 model whose MLA sizes vLLM does not serve gets an UnservableExportWarning naming the sizes.
    Models with packed (quantized) weights are refused: their fp32 weights are gone."""
    from nanoseek.weights.hf_folder import save_pretrained

    if getattr(model, "lora_adapters", None) is not None:
        raise ValueError("a model with LoRA adapters attached cannot be saved; load it without lora= to save it")
    if getattr(model, "quantization", None) or any(
        type(m).__module__.startswith("nanoseek.quant") for m in model.modules()
    ):
        raise ValueError("a model with packed (quantized) weights cannot be saved; load it with quant=None to save it")
    save_pretrained(model, path, dtype=parse_dtype(dtype))
