"""Rotary position embedding of q and k in one launch, in Meta's layout (channel pairs (0,1), (2,3), ... rotate).

One program per token loads the token's cos/sin once and rotates every head of q and of k as 2-D blocks
(heads x channel pairs). Eager PyTorch launches ~10 kernels per tensor (float, unflatten, 4 multiplies, 2 adds,
stack, cast) and writes every intermediate to memory; this reads each element once and writes it once.

A rotation is undone by the opposite rotation, so the backward is the same kernel with sin negated:
    y0 = x0 cos - x1 sin, y1 = x1 cos + x0 sin   =>   dx0 = dy0 cos + dy1 sin, dx1 = dy1 cos - dy0 sin.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .runtime import next_power_of_2, tl, triton, triton_usable  # triton, or a stand-in without it


@triton.jit
def _rotate_heads(X, Y, x_head, x_chan, y_head, y_chan, n_heads, cos, sin, pair_mask,
                  HEADS: tl.constexpr, PAIRS: tl.constexpr):
    # X, Y point at one token of a (B, T, heads, head_dim) tensor: rotate all of its heads as one 2-D block
    heads = tl.arange(0, HEADS)[:, None]  # (HEADS, 1)
    pairs = tl.arange(0, PAIRS)[None, :]  # (1, PAIRS): pair i holds channels 2i and 2i+1
    mask = (heads < n_heads) & pair_mask  # (HEADS, PAIRS)
    x0 = tl.load(X + heads * x_head + (2 * pairs) * x_chan, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + heads * x_head + (2 * pairs + 1) * x_chan, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + heads * y_head + (2 * pairs) * y_chan, (x0 * cos - x1 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + heads * y_head + (2 * pairs + 1) * y_chan, (x1 * cos + x0 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk(Q, K, QO, KO, ROPE, T, n_q_heads, n_k_heads, half,
             q0, q1, q2, q3, k0, k1, k2, k3, qo0, qo1, qo2, qo3, ko0, ko1, ko2, ko3, r0, r1, r2, r3,
             SIGN: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, PAIRS: tl.constexpr):
    token = tl.program_id(0)  # one program per token: b * T + t
    b, t = token // T, token % T
    pairs = tl.arange(0, PAIRS)[None, :]  # (1, PAIRS)
    pair_mask = pairs < half
    angle = ROPE + b * r0 + t * r1 + pairs * r2  # rope[b, t, i, 0] = cos, rope[b, t, i, 1] = sin
    cos = tl.load(angle, mask=pair_mask, other=1.0)  # loaded once, used for every head of q and k
    sin = SIGN * tl.load(angle + r3, mask=pair_mask, other=0.0)
    _rotate_heads(Q + b * q0 + t * q1, QO + b * qo0 + t * qo1, q2, q3, qo2, qo3, n_q_heads, cos, sin, pair_mask,
                  Q_HEADS, PAIRS)
    _rotate_heads(K + b * k0 + t * k1, KO + b * ko0 + t * ko1, k2, k3, ko2, ko3, n_k_heads, cos, sin, pair_mask,
                  K_HEADS, PAIRS)


def _launch(q: Tensor, k: Tensor, rope: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    r = rope if rope.dim() == 4 else rope.unsqueeze(0).expand(B, *rope.shape)  # stride 0 over the batch
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rope_qk[(B * T,)](q, k, qo, ko, r, T, Hq, Hk, D // 2, *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
                       *r.stride(), SIGN=sign, Q_HEADS=next_power_of_2(Hq), K_HEADS=next_power_of_2(Hk),
                       PAIRS=next_power_of_2(D // 2))
    return qo, ko


class RopeQKFunction(torch.autograd.Function):
    # The backward receives zeros, not None, for an unused output: autograd's default (set_materialize_grads).
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, rope: Tensor):
        ctx.save_for_backward(rope)
        return _launch(q, k, rope, 1.0)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor):
        (rope,) = ctx.saved_tensors
        return *_launch(dq, dk, rope, -1.0), None


def apply_rope_reference(x: Tensor, rope: Tensor) -> Tensor:
    """Core's ``apply_rope``: the fallback and the tests' oracle."""
    from minllama.core.model import apply_rope
    return apply_rope(x, rope)


def rope_qk(q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, T, Hq, head_dim) and k (B, T, Hk, head_dim) by ``rope`` (T, head_dim/2, 2) or
    (B, T, head_dim/2, 2) -- core's ``rope_cache`` rows -- in one kernel launch (PyTorch when Triton can't run)."""
    B, T, _, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on (B, T, head_dim)")
    if rope.shape[-3:] != (T, D // 2, 2) or rope.dim() not in (3, 4) or (rope.dim() == 4 and rope.shape[0] != B):
        raise ValueError(f"rope_qk: rope must be (T, head_dim/2, 2) or (B, T, head_dim/2, 2) = "
                         f"({B}, {T}, {D // 2}, 2); got {tuple(rope.shape)}")
    if not triton_usable(q.device):
        return apply_rope_reference(q, rope), apply_rope_reference(k, rope)
    return RopeQKFunction.apply(q, k, rope)
