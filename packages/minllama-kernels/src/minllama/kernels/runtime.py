"""Where can a Triton kernel run? On a CUDA GPU natively, or on the CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` makes ``@triton.jit`` return an interpreter that executes the kernel body with NumPy, one
program at a time: ~100x slower than PyTorch, but exact enough to test every kernel on a laptop. Triton reads the
variable when a kernel is *decorated*, i.e. when this package's kernel modules are imported: set it before that.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # triton is a Linux-only dependency: elsewhere every kernel falls back to PyTorch
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the kernel modules must still import: a stand-in whose @triton.jit leaves the function be
    HAS_TRITON = False
    tl = None  # only used inside kernel bodies (and in annotations, which are never evaluated)

    class triton:  # noqa: N801
        @staticmethod
        def jit(fn):
            return fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)


@functools.cache
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (the variable is read once, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device | str) -> bool:
    """Can our Triton kernels run on tensors of ``device``?"""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if interpreting():
        return device.type == "cpu"  # the interpreter works on host memory
    return device.type == "cuda" and torch.cuda.is_available()


def next_power_of_2(n: int) -> int:
    """Triton blocks have power-of-two sizes: a row of n elements is covered by one block of this size + a mask."""
    return 1 << max(n - 1, 0).bit_length()
