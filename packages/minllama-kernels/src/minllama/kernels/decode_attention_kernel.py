"""Attention for one new token per sequence over the KV cache (decoding), forward only.

During decoding each step has a single query per head, so attention is a matrix-*vector* product over the cache:
memory-bound again (every cached key and value is read once to do two multiply-adds each). One program handles one
(sequence, query head): it streams the cache of that head's key/value head in blocks of slots with an online
softmax (running max ``m``, running sum ``l``, running weighted sum ``acc``, rescaled when the max grows), so no
(heads, slots) score matrix is ever written. Query heads h*n_rep .. (h+1)*n_rep-1 read kv head h (GQA) directly.

Inference only: decoding runs without gradients, so there is no backward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .runtime import next_power_of_2, tl, triton, triton_usable  # triton, or a stand-in without it


@triton.jit
def _decode_attention(Q, K, V, ALLOWED, OUT, n_slots, n_rep, head_dim, scale,
                      q0, q1, q3, k0, k1, k2, k3, v0, v1, v2, v3, a0, a1, o0, o1,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)  # sequence, query head
    kv = h // n_rep  # its key/value head
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(Q + b * q0 + h * q1 + d * q3, mask=d_mask, other=0.0).to(tl.float32) * scale  # (BLOCK_D,)
    m = tl.full((1,), -1e30, tl.float32)  # running max of the scores
    l = tl.zeros((1,), tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros((BLOCK_D,), tl.float32)  # running sum of exp(score - m) * v
    for start in range(0, n_slots, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)  # (BLOCK_S,) cache slots
        ok = (s < n_slots) & (tl.load(ALLOWED + b * a0 + s * a1, mask=s < n_slots, other=0) != 0)
        tile = s[:, None] * k2 + d[None, :] * k3  # (BLOCK_S, BLOCK_D) offsets into this head's keys
        keys = tl.load(K + b * k0 + kv * k1 + tile, mask=ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1), -1e30)  # (BLOCK_S,)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.where(ok, tl.exp(scores - m_new), 0.0)
        alpha = tl.exp(m - m_new)  # rescales what was accumulated under the old max
        vals = tl.load(V + b * v0 + kv * v1 + s[:, None] * v2 + d[None, :] * v3,
                       mask=ok[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(OUT + b * o0 + h * o1 + d, (acc / l).to(OUT.dtype.element_ty), mask=d_mask)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """What core's Attention computes for the same inputs."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(head_dim) + mask) v for one query token.

    q: (B, n_heads, 1, head_dim); k, v: (B, n_kv_heads, S, head_dim) (the KV cache); mask: None or boolean
    (1 or B, 1, 1, S), True = may attend (core's ``attention_mask``). Returns (B, n_heads, 1, head_dim).
    """
    B, Hq, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if T != 1 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % Hk:
        raise ValueError(f"decode_attention: needs q (B, n_heads, 1, head_dim) and k, v (B, n_kv_heads, S, head_dim)"
                         f" with n_heads a multiple of n_kv_heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape[-1] != S or mask.numel() not in (S, B * S)):
        raise ValueError(f"decode_attention: mask must be boolean (1 or B, 1, 1, {S}); got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not triton_usable(q.device) or torch.is_grad_enabled() and q.requires_grad:
        return decode_attention_reference(q, k, v, mask)
    allowed = (torch.ones(1, S, dtype=torch.int8, device=q.device) if mask is None
               else mask.reshape(-1, S).to(torch.int8))  # (1 or B, S)
    a0 = 0 if allowed.shape[0] == 1 else allowed.stride(0)
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    _decode_attention[(B, Hq)](q, k, v, allowed, out, S, Hq // Hk, D, 1.0 / math.sqrt(D),
                               q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), a0, allowed.stride(1),
                               out.stride(0), out.stride(1), BLOCK_S=min(64, next_power_of_2(S)),
                               BLOCK_D=next_power_of_2(D))
    return out
