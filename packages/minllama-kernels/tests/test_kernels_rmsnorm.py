"""RMSNorm kernel vs core's RMSNorm: values and gradients, with and without the fused residual add."""
import pytest
import torch

from kernels_helpers import compare, leaf
from minllama.core.model import RMSNorm
from minllama.kernels import rms_norm
from minllama.kernels.rmsnorm import RMSNormFunction


def core_norm(weight: torch.Tensor, eps: float) -> RMSNorm:
    """Core's RMSNorm module with ``weight`` (a differentiable tensor, not a copy) as its gain."""
    norm = RMSNorm(weight.shape[0], eps)
    del norm.weight
    norm.weight = weight
    return norm


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 48)])  # one element; odd width; 3-D
def test_rmsnorm_matches_core(target, shape):
    device, dtype = target
    torch.manual_seed(0)
    x, w = leaf(torch.randn(shape), device, dtype), leaf(torch.rand(shape[-1]) + 0.5, device, dtype)
    compare(lambda x, w: RMSNormFunction.apply(x, w, 1e-5, None), lambda x, w: core_norm(w, 1e-5)(x), [x, w], dtype)


def test_rmsnorm_fused_residual(target):
    device, dtype = target
    torch.manual_seed(1)
    x, r = leaf(torch.randn(4, 3, 21), device, dtype), leaf(torch.randn(4, 3, 21), device, dtype)
    w = leaf(torch.randn(21), device, dtype)
    compare(lambda x, w, r: RMSNormFunction.apply(x, w, 1e-6, r),
            lambda x, w, r: (core_norm(w, 1e-6)(x + r), x + r), [x, w, r], dtype)


def test_rmsnorm_non_contiguous(target):
    device, dtype = target
    torch.manual_seed(2)
    base = torch.randn(6, 2 * 19)
    x = leaf(base, device, dtype)[:, ::2]  # column stride 2
    assert not x.is_contiguous()
    r = leaf(torch.randn(19, 6), device, dtype).T  # transposed: row stride 1
    w = leaf(torch.randn(19), device, dtype)
    compare(lambda x, w, r: RMSNormFunction.apply(x, w, 1e-5, r),
            lambda x, w, r: (core_norm(w, 1e-5)(x + r), x + r), [x, w, r], dtype)


def test_rmsnorm_rejects_wrong_width():
    with pytest.raises(ValueError, match="features"):
        rms_norm(torch.randn(2, 8), torch.ones(7))
