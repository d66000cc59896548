"""Keeping a CPU process's resident memory close to what its tensors use (glibc's allocator only).

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks above its mmap threshold with their own
mapping, returned to the system on free, but raises that threshold to the size of every such block freed
(up to 32 MiB), so after the first step a training loop's weight copies and activations come from the heap,
and the heap keeps the pages of freed blocks resident between the live ones. On the 16-block tiny
transformer (``benchmarks/memory.py``) that left an fp8 or int8 stage 2 about 100 MiB above its tensors,
more than the smaller storage saves. Two calls fix it, used by CPU runs that store weights in fp8 or int8
(whose per-layer compute copies churn the heap every step): a fixed mmap threshold (:func:`bound_heap`) and a
trim after each optimizer step (:func:`release_freed`; loading trims after every few chunks, for every model).
Stage 1 on a CPU bounds its heap too (measured at 512x512, 8 samples: peak 774 MB against 840-870 MB, the
encoding 6.0 s against 5.1-5.6 s).
Other runs keep glibc's defaults: with the threshold fixed, an fp32 stage-2 step at 512x512 took 0.889 s
against 0.617 s for the in-memory denoiser loop, and the per-step trim added about 25 ms. Elsewhere (musl,
macOS, Windows) both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold (``malloc.h``)."""
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks from this size up get their own mapping: each freed weight copy or activation of a step goes back
to the system at once, at the price of a fresh mapping (and its page faults) for each."""


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc
        return None


def release_freed() -> None:
    """Return the heap's free pages to the system (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_heap() -> bool:
    """Fix the mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for the rest of the process; True if set."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
