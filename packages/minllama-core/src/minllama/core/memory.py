"""Give freed memory back to the operating system.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands out big blocks from its heap and keeps the
pages of freed ones for reuse; blocks of different sizes freed in a different order leave holes that a later,
larger tensor may not fit, so the process's resident size (what ``top`` and a peak-memory figure count) ratchets
up although the tensors alive stay the same. Loading a model layer by layer, or prefilling a long prompt (its
activations are a few MB per layer, freed at the end), leaves such holes. ``malloc_trim`` returns the pages of
every free block; what is reused afterwards is faulted in again, once.
"""
from __future__ import annotations

import ctypes

_malloc_trim = None  # glibc's malloc_trim, once looked up (False: not available)


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc's ``malloc_trim``; elsewhere nothing). About 0.5 ms on a
    loaded model's heap, and whatever is reused later is faulted in again: call it after a phase that freed many MB
    (a load, a long prompt), not per token."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # the C library the process runs on already
        except (OSError, TypeError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
