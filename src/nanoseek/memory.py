"""Handing freed heap memory back to the operating system (glibc), and reading what the heap holds.

glibc's malloc keeps freed heap memory in the process unless it lies at the top of a heap, so after a
burst of temporaries (dequantizing a checkpoint, a batch of 64 streams' attention gathers, a freed KV
cache) the process stays as large as at its peak. `malloc_trim(0)` returns every free
page of every arena (MADV_DONTNEED), at the price of page faults when those pages are used again, so it
belongs at the points where a burst has ended: after loading, and when the engine runs out of work.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
from dataclasses import dataclass


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - not glibc (e.g. musl) when missing
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory(collect: bool = True) -> bool:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere a no-op returning False).
    collect: run the garbage collector first, so that tensors held only by reference cycles are freed too
    (a full collection: worth it after loading, not on the engine's path)."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


@dataclass(frozen=True)
class HeapStats:
    in_use: int  # bytes malloc has handed out (heap chunks + mmapped chunks)
    free: int  # bytes free inside the heap (resident or not: malloc_trim makes them non-resident)


def heap_stats() -> HeapStats | None:
    """What malloc holds now (glibc >= 2.33's mallinfo2); None where it is not available."""
    libc = _libc()
    if libc is None:
        return None
    with contextlib.suppress(AttributeError):
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return HeapStats(in_use=info.uordblks + info.hblkhd, free=info.fordblks)
    return None
