"""SwiGLU kernel vs silu(gate) * up (core FeedForward's elementwise part): values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from kernels_helpers import compare, leaf
from minllama.kernels import swiglu
from minllama.kernels.swiglu_kernel import SwiGLUFunction


def reference(g, u):
    return F.silu(g) * u


@pytest.mark.parametrize("shape", [(1,), (3, 37), (2, 3, 1100)])  # 1100: two column blocks, the second partial
def test_swiglu_matches_reference(target, shape):
    device, dtype = target
    torch.manual_seed(0)
    g, u = leaf(4 * torch.randn(shape), device, dtype), leaf(torch.randn(shape), device, dtype)
    compare(SwiGLUFunction.apply, reference, [g, u], dtype)


def test_swiglu_non_contiguous(target):
    device, dtype = target
    torch.manual_seed(1)
    g = leaf(torch.randn(13, 5), device, dtype).T  # (5, 13), column stride 5
    u = leaf(torch.randn(5, 26), device, dtype)[:, 1::2]
    compare(SwiGLUFunction.apply, reference, [g, u], dtype)


def test_swiglu_rejects_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
