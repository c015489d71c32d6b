"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1 ship this way), dequantized while loading.

Such a folder's config.json carries `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}`. Each quantized linear weight
`x.weight [out, in]` is float8_e4m3fn next to `x.weight_scale_inv [ceil(out/bo), ceil(in/bi)]` in fp32: one
multiplier per bo×bi block (the last block of a row or column may be partial). The real weight is
`fp8.float() * scale` over each block, as DeepSeek's `weight_dequant` computes it. Reading the FP8 values
without their scales would load a silently wrong model, so a checkpoint with any other quantization method
is refused by name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from nanoseek.weights.safetensors_io import SafetensorsReader, WeightsError

SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def open_checkpoint(folder: str | os.PathLike, config: dict) -> Mapping[str, torch.Tensor]:
    """The tensors of a HF folder by name, dequantized when config.json declares block-scaled FP8.

    Raises WeightsError naming the method for any other `quantization_config`."""
    folder = Path(folder)
    reader = SafetensorsReader(folder)
    quant = config.get("quantization_config")
    if not quant:
        scaled = next((name for name in reader if name.endswith(SCALE_SUFFIX)), None)
        if scaled is not None:  # FP8 values read without their scales would be a silently wrong model
            raise WeightsError(
                f"{folder}: the checkpoint holds FP8 scales ({scaled!r}) but config.json has no quantization_config"
            )
        return reader
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "fp8":
        raise WeightsError(
            f"{folder / 'config.json'}: quantization_config.quant_method {method!r} is not supported; "
            f"nanoseek reads unquantized checkpoints and block-scaled FP8 ('fp8', as DeepSeek-V3/R1 ship)"
        )
    fmt = quant.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise WeightsError(f"{folder / 'config.json'}: FP8 format {fmt!r} is not supported (e4m3, e5m2)")
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise WeightsError(f"{folder / 'config.json'}: weight_block_size {block!r} must be two positive integers")
    return Fp8Dequantized(reader, (block[0], block[1]), source=str(folder))


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 weight from FP8 values [out, in] and per-block multipliers [ceil(out/bo), ceil(in/bi)]."""
    out_dim, in_dim = weight.shape
    per_row = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim]
    per_elem = per_row.repeat_interleave(block[1], dim=1)[:, :in_dim]
    return weight.float() * per_elem


class Fp8Dequantized(Mapping[str, torch.Tensor]):
    """A reader's tensors with FP8 weights dequantized to fp32. The scale tensors are consumed here and are
    not listed: to the rest of the loader the checkpoint looks unquantized."""

    def __init__(self, reader: Mapping[str, torch.Tensor], block: tuple[int, int], *, source: str):
        self.reader, self.block, self.source = reader, block, source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.endswith(SCALE_SUFFIX):
            raise KeyError(name)
        tensor = self.reader[name]
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.reader:
            raise WeightsError(f"{self.source}: FP8 tensor {name!r} has no {scale_name!r} to dequantize it with")
        scale = self.reader[scale_name]
        if tensor.dim() != 2:
            raise WeightsError(f"{self.source}: FP8 tensor {name!r} has shape {tuple(tensor.shape)}; expected 2-D")
        expected = tuple(math.ceil(n / b) for n, b in zip(tensor.shape, self.block))
        if tuple(scale.shape) != expected:
            raise WeightsError(
                f"{self.source}: tensor {scale_name!r} has shape {tuple(scale.shape)}; weight {tuple(tensor.shape)} "
                f"in {self.block[0]}x{self.block[1]} blocks needs {expected}"
            )
        return dequantize_blocks(tensor, scale, self.block)

    def __iter__(self) -> Iterator[str]:
        return (name for name in self.reader if not name.endswith(SCALE_SUFFIX))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and not name.endswith(SCALE_SUFFIX) and name in self.reader
