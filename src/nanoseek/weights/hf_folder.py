"""HF model folders (config.json + safetensors) <-> nanoseek models, in both directions.

    save_pretrained(model, "tiny-ds3")                        # DeepSeek-V3: what transformers, vLLM, SGLang load
    save_pretrained(dense_model, "tiny-llama")               # dense families: transformers' names and config
    model = load_deepseek_v3(folder, config_dict, dtype, device)
    model = load_dense(folder, config_dict, dtype, device)     # llama / mistral / qwen2 / gemma 1-3

Checkpoint formats live here, under `weights/`, so the model code never depends on them: `weights/` imports
`model/`, never the other way round (tests/test_imports.py holds that line).
`nanoseek.load(path)` dispatches to the loaders through `loading.ARCHITECTURES`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nanoseek.model.config import ConfigError, DeepseekV3Config
from nanoseek.model.deepseek_v3 import DeepseekV3ForCausalLM
from nanoseek.model.dense import DenseForCausalLM, build_on_meta, dense_config_from_hf, dense_config_to_hf
from nanoseek.model.moe import Router
from nanoseek.weights.deepseek_v3_hf import has_mtp_weights, hf_to_native, native_to_hf
from nanoseek.weights.fp8 import open_checkpoint
from nanoseek.weights.gguf_grid import FLOAT_TYPES, FOUR_BIT_TYPES
from nanoseek.weights.mla_serving import warn_if_unservable
from nanoseek.weights.safetensors_io import WeightsError, check_shape, save_safetensors_folder

# ---- DeepSeek-V3 ------------------------------------------------------------------------------------------


def save_pretrained(
    model: DeepseekV3ForCausalLM | DenseForCausalLM, folder: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> None:
    """Write `model` as a HF folder (config.json, safetensors, generation_config.json).

    A DeepSeek-V3 model whose MLA sizes vLLM and SGLang do not serve (kv_lora_rank + qk_rope_head_dim other
    than 512 + 64) is still written, with an UnservableExportWarning naming the sizes (weights/mla_serving.py)."""
    if isinstance(model, DenseForCausalLM):
        save_dense(model, folder, dtype=dtype)
        return
    warn_if_unservable(model.config, stacklevel=_caller_stacklevel())
    tensors = native_to_hf(model)
    if dtype is not None:  # the router's correction bias stays fp32: it is compared against tiny score gaps
        tensors = {
            k: v.to(dtype) if v.is_floating_point() and "correction_bias" not in k else v for k, v in tensors.items()
        }
    cfg = model.config.to_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_safetensors_folder(folder, tensors, cfg)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (Path(folder) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _caller_stacklevel() -> int:
    """The warning's stacklevel that points at the code that asked for the export: past save_pretrained and
    `nanoseek.save` (which calls it)."""
    import sys

    frame, level = sys._getframe(2), 3  # 1: warn_if_unservable's warn, 2: save_pretrained, 3: its caller
    while frame is not None and frame.f_globals.get("__name__") == "nanoseek.loading":
        frame, level = frame.f_back, level + 1
    return level


def load_deepseek_v3(
    folder: Path,
    config: dict,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    quant: str | None = None,
) -> DeepseekV3ForCausalLM:
    """Build a DeepSeek-V3 (or V2) model from a HF folder. dtype None keeps fp32 on CPU (bf16 is slow there)
    and the checkpoint's dtype elsewhere. `quant` packs the projections after loading (nanoseek.quant)."""
    folder = Path(folder)
    try:
        cfg = DeepseekV3Config.from_dict(config)
    except ConfigError as exc:
        raise WeightsError(f"{folder / 'config.json'}: {exc}") from exc
    reader = open_checkpoint(folder, config)  # FP8 weights come back dequantized
    if cfg.num_nextn_predict_layers and not has_mtp_weights(reader, cfg):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # e.g. saved by transformers, which drops MTP weights
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg, init=False)
    state = hf_to_native(reader, model, source=str(folder))
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers("cpu")  # materialize the non-persistent (meta) buffers before moving
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        stored = next(iter(state.values())).dtype
        dtype = torch.float32 if device.type == "cpu" else stored
    model.to(device=device, dtype=dtype)
    for m in model.modules():  # the router bias stays fp32: it is compared against tiny score gaps
        if isinstance(m, Router):
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    model.init_buffers(device)
    if quant is not None:
        from nanoseek.quant import quantize_model

        quantize_model(model, quant)
    return model


# ---- dense families ---------------------------------------------------------------------------------------


def save_dense(model: DenseForCausalLM, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write a dense model as a HF folder: the inverse of load_dense. The module names are transformers' names
    already; a head tied to the embeddings is stored once, as transformers does."""
    cfg = dense_config_to_hf(model.config)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[name] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    save_safetensors_folder(folder, tensors, cfg)
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (Path(folder) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def load_dense_state(
    model: DenseForCausalLM, tensors, source: str, dtype: torch.dtype, device, quant: str | None = None
) -> DenseForCausalLM:
    """Fill a meta-device dense model from `tensors` (a mapping name -> tensor with HF names) without a second
    copy. Each tensor is checked against the shape the config implies; a missing one is an error naming it.

    With `quant` ("int8" | "fp16", CPU only; nanoseek.quant), each projection is packed as soon as it is
    read, so the model never exists whole in fp32 (a quantized GGUF is not expanded first)."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)

    def read(name: str) -> torch.Tensor:
        if name not in tensors:
            raise WeightsError(f"{source}: tensor {name!r} is missing from the checkpoint")
        t = tensors[name]
        check_shape(name, t, tuple(expected[name].shape), source)
        return t

    packed: set[str] = set()
    if quant is not None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantized weights ({quant}) are for the CPU, not {device}")
        packed = _pack_linears(model, read, quant, tied, FileBits(tensors, read))
    state = {name: read(name).to(device=device, dtype=dtype) for name in expected if name not in packed}
    model.load_state_dict(state, strict=False, assign=True)
    if quant is None:
        model.tie_weights()
    else:
        model.quantization = quant
    model._rope.clear()
    return model.eval()


class FileBits:
    """What a checkpoint says about how its tensors are stored: a GGUF's 4-bit tensors as int4's grid read
    from their blocks, and which tensors it quantized with more than 4 bits. Other checkpoints: nothing."""

    def __init__(self, tensors, read):
        self.tensors, self.read = tensors, read

    def four_bit_grids(self, names: list[str]) -> list | None:
        """Every tensor's grid (q, d, m) when all of them are stored in 4 bits, else None."""
        if not hasattr(self.tensors, "four_bit_grid"):
            return None
        grids = []
        for name in names:
            if name not in self.tensors:
                self.read(name)  # raises the missing-tensor error
            grid = self.tensors.four_bit_grid(name)
            if grid is None:
                return None
            grids.append(grid)
        return grids

    def more_than_four_bits(self, names: list[str]) -> bool:
        """Whether any of them is stored quantized with more than 4 bits (Q5_0, Q6_K, Q8_0, ...)."""
        if not hasattr(self.tensors, "qtype"):
            return False
        return any(n in self.tensors and self.tensors.qtype(n) not in (*FOUR_BIT_TYPES, *FLOAT_TYPES) for n in names)


def _pack_linears(model: torch.nn.Module, read, quant: str, tied: bool, bits: FileBits | None = None) -> set[str]:
    """Replace the meta model's projections by packed ones built from `read(name)`, one at a time; return
    the parameter names consumed. In int4, a GGUF's 4-bit projections are packed from their own blocks
    (`bits`), and projections the file quantized with more bits run as int8: fitting them to a 4-bit grid
    would throw away bits the file kept (a Q4_K_M file stores some as Q6_K or Q8_0)."""
    from nanoseek.memory import return_freed_memory
    from nanoseek.quant import (
        Int4Linear,
        fuse_projections,
        int4_or_int8,
        int8_blocks_or_rows,
        pack_embedding,
        packed_linear,
        quantizable_linears,
    )

    packed_linear(quant)  # an unknown mode or one this machine cannot run fails before anything is read
    fuse_projections(model)
    prefix_of = {id(m): f"{name}." if name else "" for name, m in model.named_modules()}
    consumed: set[str] = set()
    for module, attr, parts in quantizable_linears(model):
        names = [prefix_of[id(module)] + part for part in parts]
        weights = ["model.embed_tokens.weight"] if tied and names == ["lm_head"] else [f"{n}.weight" for n in names]
        has_bias = getattr(module, attr).bias is not None
        bias = torch.cat([read(f"{n}.bias").float() for n in names]) if has_bias else None
        make = packed_linear(quant, attr)
        grids = bits.four_bit_grids(weights) if bits and quant == "int4" and make is int4_or_int8 else None
        if grids is not None:
            grid = tuple(torch.cat(parts) for parts in zip(*grids))
            check_shape(names[0], grid[0], (getattr(module, attr).out_features, getattr(module, attr).in_features),
                        "the file's 4-bit blocks")  # fmt: skip
            setattr(module, attr, Int4Linear(None, bias, grid=grid))
        else:
            if make is int4_or_int8 and bits and bits.more_than_four_bits(weights):
                make = int8_blocks_or_rows
            # (a tied lm_head reads the embedding matrix: its one weight, not copied by a cat)
            weight = torch.cat([read(w).float() for w in weights]) if len(weights) > 1 else read(weights[0]).float()
            setattr(module, attr, make(weight, bias))
        consumed |= {f"{n}.{kind}" for n in names for kind in ("weight", "bias")}
    if pack_embedding(model, quant, lambda: read("model.embed_tokens.weight")):  # int8 rows (a tied lm_head's)
        consumed.add("model.embed_tokens.weight")
    return_freed_memory()
    return consumed


def load_dense(folder: Path, config: dict, dtype=None, device=None, quant: str | None = None) -> DenseForCausalLM:
    """llama / mistral / qwen2 / gemma / gemma2 / gemma3(_text) HF folders."""
    cfg = dense_config_from_hf(config)
    reader = open_checkpoint(folder, config)  # FP8 weights come back dequantized
    tensors = _TextModelOf(reader) if config.get("model_type") == "gemma3" else reader
    model = build_on_meta(cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return load_dense_state(model, tensors, str(folder), dtype or torch.float32, device, quant)


class _TextModelOf:
    """The text decoder's tensors inside a Gemma3ForConditionalGeneration checkpoint, under plain names
    (`language_model.model.x` or `model.language_model.x` -> `model.x`), read lazily."""

    PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))  # fmt: skip

    def __init__(self, reader):
        self.reader = reader
        self.names: dict[str, str] = {}
        for name in reader:
            for prefix, plain in self.PREFIXES:
                if name.startswith(prefix):
                    self.names[plain + name[len(prefix) :]] = name

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader[self.names[name]]
