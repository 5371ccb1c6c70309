"""A CPU GEMV for batch-1 decode that streams the weights at the memory bandwidth, and the swap that uses it.

Why: generating one token multiplies a (1, K) activation by every (N, K) weight matrix of the model once. That is
2 flops per weight read (one multiply, one add), while a CPU core does ~32 fp32 flops per cycle: the arithmetic is
free, and a decode step takes as long as reading all the weights from DRAM. The figure of merit is GB/s = weight
bytes / time, against the machine's read bandwidth. PyTorch's ``aten::mm`` for a (1, K) x (K, N) product reaches
only part of it (see ``benchmarks/gemv_bandwidth.py``); the kernel in ``csrc/gemv.h`` reads each weight row front to
back, once, with AVX-512 loads and fused multiply-adds, and splits the rows over threads.

It is part of a C++ extension (``csrc/cpu_kernels.cpp``, which also holds ``cpu_decode``'s decoder layer) built on
first use by ``torch.utils.cpp_extension`` (g++ and the Python headers: the same toolchain ``torch.compile`` needs on
a CPU), ~20-40 s on 2 cores, then cached per user under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and loaded in well under a second. Where it cannot run (no AVX-512, no compiler, a
failed build) ``gemv`` is ``F.linear`` and ``use_cpu_gemv`` changes nothing.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"  # includes csrc/gemv.h and csrc/blocks.h
EXTENSION = "minllama_cpu_kernels"
# -fopenmp: at::parallel_for is inline OpenMP code; compiled without it, it silently runs on one thread (half the
# bandwidth on 2 cores). The OpenMP runtime it links is the one torch already loaded (libgomp.so.1).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c", "-mavx512vnni", "-fopenmp"]


def cpu_gemv_supported() -> str | None:
    """None when the kernel can be built and run here, else the reason why not (for skips and warnings)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"the CPU (or ATEN_CPU_CAPABILITY) has no AVX-512: {torch.backends.cpu.get_cpu_capability()}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) on PATH: install g++ (the compiler torch.compile uses too)"
    if not _find_ninja():
        return "no ninja build tool (cpp_extension needs it): pip install ninja"
    return None


def _find_ninja() -> bool:
    """cpp_extension runs ``ninja`` from PATH. The ``ninja`` wheel (our dependency) installs it next to the
    interpreter, which is not on PATH when a venv's python is run without activating the venv: add its folder."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


@functools.cache
def _extension():
    """Build (first call ever: tens of seconds) or load (cached) the extension; None if it cannot be had."""
    reason = cpu_gemv_supported()
    if reason is None:
        try:
            return _cpp_extension().load(EXTENSION, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                        extra_include_paths=[str(SOURCE.parent)])
        except Exception as error:  # a broken toolchain must not break inference: fall back, say why once
            reason = f"building {SOURCE.name} failed: {error}"
    warnings.warn(f"minllama.kernels.cpu_gemv falls back to F.linear: {reason}", stacklevel=3)
    return None


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time warning about CUDA on a machine without CUDA
    (this extension is for the CPU): a chat app's output stays clean."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    import torch.utils.cpp_extension
    return torch.utils.cpp_extension


def extension_built() -> bool:
    """Has this machine already built the extension (so that loading it takes a fraction of a second)? A guess from
    the build folder, for a "building, once" message; ``_extension`` decides, and rebuilds if the source changed."""
    try:
        return any(Path(_cpp_extension()._get_build_directory(EXTENSION, verbose=False)).glob(f"{EXTENSION}*.so"))
    except Exception:
        return False


def cpu_gemv_usable() -> bool:
    """Is the C++ kernel available (building it now if it has not been built yet)?"""
    return _extension() is not None


def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """``weight @ x`` for x (K,) and weight (N, K), fp32 or bf16 weights, fp32 accumulation; returns (N,) fp32.

    The kernel reads x in fp32: a bf16 x is widened first (K numbers, nothing next to the N*K weights)."""
    if x.dim() != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[0]:
        raise ValueError(f"gemv needs x (K,) and weight (N, K); got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}: pass one token's activation and an nn.Linear weight")
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu":
        raise ValueError(f"gemv runs fp32 or bf16 weights on the CPU; got {weight.dtype} on {weight.device}: "
                         "use F.linear for other dtypes and devices")
    ext = _extension()
    if ext is None:
        return F.linear(x.float(), weight.float())
    return ext.gemv(x.float().contiguous(), "float", [weight.contiguous()])


class GemvLinear(nn.Linear):
    """nn.Linear whose single-token forward (batch * seq == 1, no gradient needed) runs the CPU GEMV kernel.

    Every other call, e.g. prefill over a prompt (a GEMM, compute-bound, where oneDNN is good) or training, is
    ``nn.Linear.forward``. Weights, state_dict keys and tied parameters are untouched: only the class changes."""

    def forward(self, x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.numel() != self.in_features or needs_grad or x.device.type != "cpu" \
                or self.weight.dtype not in (torch.float32, torch.bfloat16):
            return super().forward(x)
        y = gemv(x.reshape(-1), self.weight)  # (out_features,) fp32
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B=1, T=1, out_features)


def use_cpu_gemv(model: nn.Module) -> nn.Module:
    """Swap every plain ``nn.Linear`` of a CPU model for ``GemvLinear``, in place; returns the model.

    Subclasses (LoRA, quantized linears) keep their own forward. Nothing changes when the kernel cannot run here
    (it warns once why) or the model is not on the CPU. ``remove_cpu_gemv(model)`` undoes it."""
    if next(model.parameters()).device.type != "cpu" or not cpu_gemv_usable():
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
    return model


def remove_cpu_gemv(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if type(module) is GemvLinear:
            module.__class__ = nn.Linear
    return model
