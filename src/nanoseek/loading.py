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


def load(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quant: str | None = None,
) -> torch.nn.Module:
    """Load a model from a HF folder (config.json + safetensors) or a .gguf file, ready for inference.

    Calling the returned module on a LongTensor [B, T] gives logits [B, T, vocab].
    `quant` ("int8" | "fp16", CPU inference): the projections run packed (nanoseek.quant); dense models
    and GGUF files are packed while loading, without an fp32 copy of the whole model.
    Raises FileNotFoundError / ValueError naming the file and the problem.
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    quant = None if quant in (None, "none") else quant
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
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
    return model.eval()
