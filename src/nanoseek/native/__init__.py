"""Building nanoseek's C++ kernels (native/csrc/*.cpp) on first use, and loading them into torch.

Each source is compiled once per (source, flags, torch installation, Python version) into the cache
(`$NANOSEEK_CACHE/kernels`; a few seconds with g++, which torch.compile on CPU needs as well) and loaded with
`torch.ops.load_library`, which registers its ops under `torch.ops.nanoseek`. The callers say what happens
where a kernel cannot be built (quant/q4_kernel.py: int4 is refused with the reason; engine/paged_attention.py:
decode attention runs unfused).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanoseek.assets import default_cache_dir

CSRC = Path(__file__).with_name("csrc")
RECIPE = "2: compiled, then linked without the flags"  # part of the cache key: a new recipe rebuilds


def library_path(source: Path, flags: tuple[str, ...] = ()) -> Path:
    # the torch it is built against: its version and where it lives (the library links to its libc10)
    built_against = f"{torch.__version__} {Path(torch.__file__).parent} {sys.version} {' '.join(flags)} {RECIPE}"
    key = hashlib.sha256(source.read_bytes() + built_against.encode()).hexdigest()[:16]
    return default_cache_dir() / "kernels" / f"{source.stem}-{key}.so"


def compile_library(source: Path, target: Path, flags: tuple[str, ...] = ()) -> None:
    """Compile `source` with `flags`, then link it separately: linked with -ffast-math, g++ (before 13) adds
    crtfastmath.o, which switches the whole process's FPU to flushing subnormals to zero when the library loads
    (measured: 5e-324 * 1.0 == 0.0 in Python afterwards)."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cxx = os.environ.get("CXX", "g++")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: concurrent builders never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    compile_cmd = [
        cxx,
        *("-O3", "-std=c++17", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *flags),
        f"-I{torch_dir / 'include'}",
        *("-c", str(source), "-o", obj),
    ]
    link_cmd = [
        cxx,
        *("-shared", "-fopenmp", obj, "-o", tmp),
        f"-L{torch_dir / 'lib'}",
        *("-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"),
    ]
    try:
        for cmd in (compile_cmd, link_cmd):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)


def build_and_load(source: Path, target: Path, what: str, flags: tuple[str, ...] = ()) -> str | None:
    """Compile `source` into `target` unless it is there, and load it. None when loaded, else why not
    (`what` names the kernel in the reason)."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        return f"{what} is built for x86-64 Linux"
    try:
        if not target.exists():
            compile_library(source, target, flags)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"{what} could not be built or loaded ({str(exc).strip()[:300]})"
    return None


class Kernel:
    """A library of csrc/ for x86-64 CPUs with AVX2, built (once per source, flags and torch) and loaded into torch
    on first use. `unavailable_reason()` says why it cannot run here, or None when it can."""

    def __init__(self, source: str, what: str, flags: tuple[str, ...] = ()):
        self.source, self.what, self.flags = CSRC / source, what, flags
        self._reason: str | None = None
        self._tried = False

    def unavailable_reason(self) -> str | None:
        if not self._tried:  # once per process: loading a library twice would register its ops twice
            self._reason, self._tried = self._load(), True
        return self._reason

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def _load(self) -> str | None:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return f"{self.what} needs AVX2"
        return build_and_load(self.source, library_path(self.source, self.flags), self.what, self.flags)
