"""Run every kernel on the CPU through Triton's interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when minllama.kernels is first imported, so it is
set here, before any test module imports the package. On a CUDA machine the kernels run natively instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels_helpers import DEVICES  # noqa: E402  (after the variable is set)


@pytest.fixture(params=DEVICES, ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def target(request):
    """(device, dtype) the kernels are tested on: cpu/fp32 under the interpreter; cuda/fp32 and cuda/bf16."""
    device, dtype = request.param
    from minllama.kernels import triton_usable
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not triton_usable(device):
        pytest.skip(f"Triton cannot run on {device} here (the CPU needs TRITON_INTERPRET=1, set only without CUDA)")
    return torch.device(device), dtype
