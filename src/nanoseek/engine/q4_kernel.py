"""nanoseek's 4-bit CPU kernel (csrc/q4_linear.cpp): GGUF Q4_1's grid times int8 activations with AVX512-VNNI
dot products, the scheme llama.cpp decodes Q4 files with.

Why our own kernel: torch has no x86 4-bit kernel that stays bound by memory. `_weight_int4pack_mm_for_cpu`
converts every nibble to bf16 and is bound by that arithmetic, so it reads half int8's bytes yet decoded only
0-5% faster than int8 (issue 11's profile); torchao's x86 int4 layout calls the same kernel. Here one
vpdpbusd multiplies 64 nibbles by 64 int8 activations, and a token reads 5 bits per weight.

The C++ file is compiled once per (source, torch installation, Python version) into the cache
(`$NANOSEEK_CACHE/kernels`; 5 s with g++, which torch.compile on CPU needs as well) and loaded with
`torch.ops.load_library`. Where it cannot be built or the CPU lacks AVX512-VNNI, `unavailable_reason()`
says why, and int4 is refused with that reason (int8 runs everywhere).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanoseek.assets import default_cache_dir

SOURCE = Path(__file__).with_name("csrc") / "q4_linear.cpp"
BLOCK = 32  # inputs per block: Q4_1's
PANEL = 16  # output rows per panel (one AVX512 register of fp32)
PANEL_BYTES = 320  # per (panel, block): 256 bytes of nibbles, 16 fp16 scales, 16 fp16 minimums


def _library_path() -> Path:
    # the torch it is built against: its version and where it lives (the library links to its libc10)
    built_against = f"{torch.__version__} {Path(torch.__file__).parent} {sys.version}".encode()
    key = hashlib.sha256(SOURCE.read_bytes() + built_against).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"q4_linear-{key}.so"


def _compile(target: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: concurrent builders never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [
        os.environ.get("CXX", "g++"),
        *("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"),
        f"-I{torch_dir / 'include'}",
        str(SOURCE),
        "-o",
        tmp,
        f"-L{torch_dir / 'lib'}",
        *("-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_and_load(target: Path) -> str | None:
    """Compile the kernel into `target` unless it is there, and load it. None when the CPU can run it, else
    the reason it cannot be used."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return "the 4-bit kernel is built for x86-64 Linux"
    try:
        if not target.exists():
            _compile(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"the 4-bit kernel could not be built or loaded ({str(exc).strip()[:300]})"
    if not torch.ops.nanoseek.q4_supported():
        return "this CPU lacks AVX512-VNNI, which the 4-bit kernel needs"
    return None


@functools.cache
def _load() -> str | None:
    return build_and_load(_library_path())


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
