"""Give freed memory back to the operating system.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands out big blocks from its heap and keeps the
pages of freed ones for reuse; blocks of different sizes freed in a different order leave holes that a later,
larger tensor may not fit, so the process's resident size (what ``top`` and a peak-memory figure count) ratchets
up although the tensors alive stay the same. Loading a model layer by layer, or prefilling a long prompt (its
activations are a few MB per layer, freed at the end), leaves such holes. ``malloc_trim`` returns the pages of
every free block; what is reused afterwards is faulted in again, once.

Intel's MKL, which PyTorch's x86 builds link in for fp32 matrix products, keeps a pool of its own: the work buffers
of its GEMMs stay allocated after each call, for the next one (~20 MB after one 512-token prefill of SmolLM2).
``release_free_memory`` empties that pool too. To have no pool at all (a peak 15-20 MB lower while prefilling), set
``MKL_DISABLE_FAST_MM=1`` before ``import torch``: MKL reads it once, when it starts; ``apps/chat.py``, ``serve.py``
and ``bench.py`` do. The cost, measured in pairs of runs: none for an fp32 prefill; an int8 model's 512-token
prefill (a dequantized matrix, then MKL's buffers, each product) takes the same time when the heap has free room
for the buffers and up to ~15% longer when it has not (their pages are then faulted in anew every time).
"""
from __future__ import annotations

import ctypes
import os

_malloc_trim = None  # glibc's malloc_trim, once looked up (False: not available)
_mkl_free_buffers = None  # MKL's mkl_free_buffers, once looked up (False: not available)


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (MKL's buffer pool first, then glibc's ``malloc_trim``; where
    either is missing, nothing). About 0.5 ms on a loaded model's heap, and whatever is reused later is faulted in
    again: call it after a phase that freed many MB (a load, a long prompt), not per token."""
    global _malloc_trim, _mkl_free_buffers
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # the C library the process runs on already
        except (OSError, TypeError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
            _malloc_trim = False
    if _mkl_free_buffers is None:
        _mkl_free_buffers = _find_mkl_free_buffers()
    if _mkl_free_buffers:
        _mkl_free_buffers()
    if _malloc_trim:
        _malloc_trim(0)


def _find_mkl_free_buffers():
    """MKL's ``mkl_free_buffers``, which PyTorch's CPU library (where MKL is linked in) exports under its internal
    name ``mkl_serv_free_buffers``; False where torch has no MKL (ARM, macOS) or the library is not loaded."""
    import torch

    try:
        library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        return ctypes.CDLL(library, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).mkl_serv_free_buffers  # loaded already
    except (OSError, AttributeError):
        return False
