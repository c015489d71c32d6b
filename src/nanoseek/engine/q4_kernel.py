"""nanoseek's 4-bit CPU kernel (csrc/q4_linear.cpp): GGUF Q4_1's grid times int8 activations with AVX512-VNNI
dot products, the scheme llama.cpp decodes Q4 files with.

Why our own kernel: torch has no x86 4-bit kernel that stays bound by memory. `_weight_int4pack_mm_for_cpu`
converts every nibble to bf16 and is bound by that arithmetic, so it reads half int8's bytes yet decoded only
0-5% faster than int8 (issue 11's profile); torchao's x86 int4 layout calls the same kernel. Here one
vpdpbusd multiplies 64 nibbles by 64 int8 activations, and a token reads 5 bits per weight.

The C++ file is compiled on first use (engine/native.py; 5 s with g++). Where it cannot be built or the CPU
lacks AVX512-VNNI, `unavailable_reason()` says why, and int4 is refused with that reason (int8 runs everywhere).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nanoseek.engine import native

SOURCE = native.CSRC / "q4_linear.cpp"
BLOCK = 32  # inputs per block: Q4_1's
PANEL = 16  # output rows per panel (one AVX512 register of fp32)
PANEL_BYTES = 320  # per (panel, block): 256 bytes of nibbles, 16 fp16 scales, 16 fp16 minimums


def build_and_load(target: Path) -> str | None:
    """Compile the kernel into `target` unless it is there, and load it. None when the CPU can run it, else
    the reason it cannot be used."""
    if reason := native.build_and_load(SOURCE, target, "the 4-bit kernel"):
        return reason
    if not torch.ops.nanoseek.q4_supported():
        return "this CPU lacks AVX512-VNNI, which the 4-bit kernel needs"
    return None


@functools.cache
def _load() -> str | None:
    return build_and_load(native.library_path(SOURCE))


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can (builds it on first use)."""
    return _load()


def available() -> bool:
    return _load() is None


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks -> the kernel's layout. q [out, in] in 0..15, d and m [out, in / 32] (the weight is
    d * q + m per block), stored as fp16. Returns uint8 [panels, blocks, 320] (rows padded to 16 with zeros;
    the layout is described in csrc/q4_linear.cpp)."""
    rows, k = q.shape
    blocks = k // BLOCK
    pad = -rows % PANEL
    q = torch.cat([q.to(torch.uint8), q.new_zeros(pad, k, dtype=torch.uint8)])
    d = torch.cat([d.to(torch.float16), d.new_zeros(pad, blocks, dtype=torch.float16)])
    m = torch.cat([m.to(torch.float16), m.new_zeros(pad, blocks, dtype=torch.float16)])
    panels = q.shape[0] // PANEL
    # [panel, row j, block, L, half h, r] -> [panel, block, L, h, j, r]; input = 32 b + 8 L + 4 h + r
    q = q.view(panels, PANEL, blocks, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    nibbles = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(panels, blocks, 256)
    d = d.view(panels, PANEL, blocks).transpose(1, 2).contiguous().view(torch.uint8)
    m = m.view(panels, PANEL, blocks).transpose(1, 2).contiguous().view(torch.uint8)
    return torch.cat([nibbles, d, m], dim=2).contiguous()


def q4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [rows, in] fp32 @ the packed weight's transpose -> [rows, out_features] fp32."""
    return torch.ops.nanoseek.q4_linear(x, packed, out_features)
