"""Decode attention kernel (one query token over the KV cache) vs F.scaled_dot_product_attention."""
import pytest
import torch

from kernels_helpers import TOLERANCE
from minllama.kernels import decode_attention
from minllama.kernels.decode_attention_kernel import decode_attention_reference


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (4, 2), (3, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_row"])
def test_decode_attention_matches_sdpa(target, Hq, Hk, mask_kind):
    device, dtype = target
    torch.manual_seed(0)
    B, S, D = 2, 67, 6  # 67 slots: two blocks of 64, the second partial; 6 channels: a masked block of 8
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype)
    k, v = torch.randn(B, Hk, S, D, device=device, dtype=dtype), torch.randn(B, Hk, S, D, device=device, dtype=dtype)
    mask = None
    if mask_kind != "none":
        rows = 1 if mask_kind == "shared" else B
        mask = torch.rand(rows, 1, 1, S, device=device) > 0.4
        mask[..., 3] = True  # a query always sees at least itself
    with torch.no_grad():
        got = decode_attention(q, k, v, mask)
    want = decode_attention_reference(q.float(), k.float(), v.float(), mask)
    assert got.shape == (B, Hq, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype])


def test_decode_attention_non_contiguous_cache(target):
    device, dtype = target
    torch.manual_seed(1)
    q = torch.randn(1, 1, 2, 5, device=device, dtype=dtype).transpose(1, 2)  # (1, 2, 1, 5) from a (1, 1, 2, 5)
    k = torch.randn(1, 9, 1, 5, device=device, dtype=dtype).transpose(1, 2)  # (B, Hk, S, D) slots-major
    v = torch.randn(1, 1, 9, 10, device=device, dtype=dtype)[..., ::2]
    with torch.no_grad():
        got = decode_attention(q, k, v)
    torch.testing.assert_close(got.float(), decode_attention_reference(q.float(), k.float(), v.float(), None),
                               **TOLERANCE[dtype])


def test_decode_attention_rejects_several_queries():
    with pytest.raises(ValueError, match="1, head_dim"):
        decode_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
