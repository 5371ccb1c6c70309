"""Fused q/k RoPE vs core's apply_rope (Meta's adjacent-pair layout): values and gradients."""
import pytest
import torch

from kernels_helpers import compare, leaf
from minllama.core.config import LlamaConfig
from minllama.core.model import apply_rope, rope_cache, rope_frequencies
from minllama.kernels import rope_qk
from minllama.kernels.rope import RopeQKFunction


def rope_for(head_dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    cfg = LlamaConfig(dim=head_dim, n_heads=1, head_dim=head_dim, rope_theta=theta)
    return rope_cache(rope_frequencies(cfg), length)  # (length, head_dim/2, 2)


def reference(q, k, rope):
    return apply_rope(q, rope), apply_rope(k, rope)


@pytest.mark.parametrize("B,T,Hq,Hk,D", [(1, 1, 1, 1, 2), (2, 5, 3, 1, 10), (1, 4, 4, 2, 16)])  # odd pair counts
def test_rope_matches_core(target, B, T, Hq, Hk, D):
    device, dtype = target
    torch.manual_seed(0)
    q, k = leaf(torch.randn(B, T, Hq, D), device, dtype), leaf(torch.randn(B, T, Hk, D), device, dtype)
    rope = rope_for(D, 64)[3:3 + T].to(device)  # positions 3 .. 3+T-1, as during cached decoding
    compare(lambda q, k: RopeQKFunction.apply(q, k, rope), lambda q, k: reference(q, k, rope), [q, k], dtype)


def test_rope_per_sequence_positions(target):
    """(B, T, head_dim/2, 2) rope: each row has its own positions (left-padded batches)."""
    device, dtype = target
    torch.manual_seed(1)
    B, T, H, D = 2, 3, 2, 6
    positions = torch.tensor([[0, 1, 2], [0, 0, 1]])
    rope = rope_for(D, 16)[positions].to(device)
    q, k = leaf(torch.randn(B, T, H, D), device, dtype), leaf(torch.randn(B, T, 1, D), device, dtype)
    compare(lambda q, k: RopeQKFunction.apply(q, k, rope), lambda q, k: reference(q, k, rope), [q, k], dtype)


def test_rope_non_contiguous(target):
    device, dtype = target
    torch.manual_seed(2)
    B, T, H, D = 2, 3, 3, 8
    q = leaf(torch.randn(B, H, T, D), device, dtype).transpose(1, 2)  # (B, T, H, D) with heads outermost
    k = leaf(torch.randn(B, T, 2, 2 * D), device, dtype)[..., ::2]  # channel stride 2
    assert not q.is_contiguous() and not k.is_contiguous()
    rope = rope_for(D, T).to(device)
    compare(lambda q, k: RopeQKFunction.apply(q, k, rope), lambda q, k: reference(q, k, rope), [q, k], dtype)


def test_rope_only_q_used(target):
    """A loss that reads only q still gives k a (zero) gradient without errors."""
    device, dtype = target
    q, k = leaf(torch.randn(1, 2, 1, 4), device, dtype), leaf(torch.randn(1, 2, 1, 4), device, dtype)
    qo, _ = rope_qk(q, k, rope_for(4, 2).to(device))
    gq, gk = torch.autograd.grad(qo.float().square().sum(), [q, k])
    assert torch.equal(gk, torch.zeros_like(k))
    torch.testing.assert_close(gq.float(), 2 * q.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_rope_rejects_wrong_cache():
    with pytest.raises(ValueError, match="rope must be"):
        rope_qk(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), rope_for(8, 4))
