"""Which dtype to run a model in when the user does not say: the fastest one this device computes natively.

Why it depends on the machine: bf16 halves the bytes every decode step reads (decoding is bound by memory
bandwidth) and doubles the rate of matrix products, but only where the hardware has bf16 arithmetic. GPUs since
Ampere do; on an x86 CPU it takes AVX-512 BF16 or AMX (Intel since Cooper Lake / Sapphire Rapids, AMD since Zen 4).
Without them, PyTorch emulates bf16 by converting every number, and the same model runs several times *slower*
than in fp32 (measured ~4x on an AVX2-only Zen 3). ``apps/bench.py`` shows both dtypes side by side, with what
bf16 costs in logits and perplexity.
"""
from __future__ import annotations

import functools

import torch


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 arithmetic (AVX-512 BF16 or AMX-BF16) that PyTorch's kernels use."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # PyTorch's CPU kernels were built or told not to use it
        return False
    flags = cpu_flags()
    if flags is None:  # not Linux: ask PyTorch (a private helper, absent in some versions)
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(check and check())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 on GPUs and CPUs with native bf16 arithmetic, fp32 elsewhere (and on every other device)."""
    kind = torch.device(device).type
    if (kind == "cuda" and torch.cuda.is_bf16_supported()) or (kind == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A ``--dtype`` option's value as a torch dtype: "auto" is ``default_dtype(device)``."""
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


DTYPE_HELP = ("weight and compute dtype (auto: bfloat16 on GPUs and on CPUs with bf16 arithmetic, AVX-512 BF16 or "
              "AMX, where it is measured faster; float32 elsewhere, where bf16 is emulated and several times slower)")
