"""Keep freed memory inside the process instead of handing it back to the system (glibc).

A training step allocates and frees the same large buffers every step: expert weight
gradients, activations, the grouped FFN's [N, h] buffers. glibc serves every request above its
mmap threshold (128 KiB at start, raised adaptively to at most 32 MiB) with a fresh mmap and
unmaps it on free, so each step pays the kernel's page faults and page zeroing again: at
T = 2048 tokens and 64 experts (d = 256, f = 1024) that was a quarter of an MoE layer's
forward + backward (docs/benchmarks.md). With mmap off and trimming off, freed blocks stay in
the heap and the next step reuses them. The price: the process's RSS stays at its peak rather
than following the live tensors, which for a training or benchmark process (steady state is the
peak) costs nothing: the default preset's SaMoE step held 598 MiB from step 20 to 120 (575-589
without), the MoE's 614-632 (592-611 without).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4


def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Switch glibc malloc to keeping freed memory for reuse; False where that is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system now (glibc's malloc_trim(0)); True if any
    went back. For the end of a phase whose peak the steady state never reaches again: a run's
    set-up tokenises its corpus through about 1.4 GB at the default preset, and with freed memory
    kept the whole run held that (1.55 GB of RSS); released, the run holds 0.8 GB."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
