"""nanoseek's 4-bit CPU kernel (native/csrc/q4_linear.cpp): GGUF Q4_1's grid times int8 activations in integer dot
products, the scheme llama.cpp decodes Q4 files with: AVX512-VNNI where the CPU has it, else AVX2 (the same
bits, more instructions per weight).

Why our own kernel: torch has no x86 4-bit kernel that stays bound by memory. `_weight_int4pack_mm_for_cpu`
converts every nibble to bf16 and is bound by that arithmetic, so it reads half int8's bytes yet decoded only
0-5% faster than int8 (issue 11's profile); torchao's x86 int4 layout calls the same kernel. Here one
vpdpbusd multiplies 64 nibbles by 64 int8 activations (vpmaddubsw 32, on AVX2), and a token reads 5 bits per
weight.

The C++ file is compiled on first use (nanoseek.native; 5 s with g++). Where it cannot be built or the CPU
lacks AVX2, `unavailable_reason()` says why, and int4 is refused with that reason (int8 runs everywhere).
`NANOSEEK_Q4_ISA=avx2` makes a process run the AVX2 path on a CPU with AVX512-VNNI (to measure what a CPU
without it gets, e.g. `NANOSEEK_Q4_ISA=avx2 nanoseek bench decode smollm2 --formats int4`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from nanoseek import native

KERNEL = native.Kernel("q4_linear.cpp", "the 4-bit kernel")
BLOCK = 32  # inputs per block: Q4_1's
PANEL = 16  # output rows per panel (one AVX512 register of fp32)
PANEL_BYTES = 320  # per (panel, block): 256 bytes of nibbles, 16 fp16 scales, 16 fp16 minimums
ISAS = ("avx512vnni", "avx2")  # the kernel's code paths


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can (builds it on first use)."""
    if reason := KERNEL.unavailable_reason():
        return reason
    if torch.ops.nanoseek.q4_isa() == "none":
        return "this CPU lacks FMA or F16C, which the 4-bit kernel needs beside AVX2"
    return _isa_from_environment()


@functools.cache
def _isa_from_environment() -> str | None:
    """Once per process: the code path NANOSEEK_Q4_ISA asks for, or the reason it cannot be had."""
    wanted = os.environ.get("NANOSEEK_Q4_ISA")
    if not wanted:
        return None
    if wanted not in ISAS:
        return f"NANOSEEK_Q4_ISA={wanted!r}: choose {' or '.join(ISAS)}"
    try:
        _switch(wanted)
    except ValueError as exc:
        return f"NANOSEEK_Q4_ISA={wanted}: {exc}"
    return None


def _switch(name: str) -> str:
    """Make the kernel run `name`'s path; returns the path it ran. A ValueError when the CPU lacks it."""
    try:
        return torch.ops.nanoseek.q4_use_isa(name)
    except RuntimeError as exc:
        raise ValueError(str(exc).splitlines()[0]) from None


def available() -> bool:
    return unavailable_reason() is None


def isa() -> str:
    """The code path the kernel runs: "avx512vnni" or "avx2" (the best the CPU has unless `use_isa` chose)."""
    return torch.ops.nanoseek.q4_isa()


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernel's `name` path ("avx512vnni" or "avx2") inside the block, for tests and benchmarks: the AVX2
    path on a CPU that has AVX512. A ValueError when the CPU lacks it."""
    if reason := unavailable_reason():
        raise ValueError(reason)
    if name not in ISAS:
        raise ValueError(f"unknown code path {name!r}; choose {' or '.join(ISAS)}")
    previous = _switch(name)
    try:
        yield
    finally:
        _switch(previous)


@contextlib.contextmanager
def use_prefetch(blocks: int) -> Iterator[None]:
    """Prefetch the weights `blocks` blocks ahead (0: none; the kernel's default is 8, measured best on SmolLM2's
    shapes) inside the block, for benchmarks (benchmarks/int4_kernels.py --prefetch-blocks). Results are the same
    bits at any distance; only the speed changes."""
    if reason := unavailable_reason():
        raise ValueError(reason)
    if not 0 <= blocks <= 64:
        raise ValueError(f"prefetch distance must be 0..64 blocks, got {blocks}")
    previous = torch.ops.nanoseek.q4_use_prefetch(blocks)
    try:
        yield
    finally:
        torch.ops.nanoseek.q4_use_prefetch(previous)


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks -> the kernel's layout. q [out, in] in 0..15, d and m [out, in / 32] (the weight is
    d * q + m per block), stored as fp16. Returns uint8 [panels, blocks, 320] (rows padded to 16 with zeros;
    the layout is described in native/csrc/q4_linear.cpp)."""
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


def q4_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None):
    """x [..., in] @ the packed weight's transpose (+ bias [out_features]) -> [..., out_features] fp32."""
    return torch.ops.nanoseek.q4_linear(x, packed, out_features, bias)
