"""RMSNorm, optionally fused with the residual add before it: y = (x + r) / rms(x + r) * w.

One Triton program normalizes one row (one token): it loads the row once, reduces it in fp32, and writes the
output once. PyTorch eager reads and writes the row ~5 times (square, mean, rsqrt, two multiplies); the op is
memory-bound, so the fused kernel is faster by roughly that factor. The backward is derived in the README:

    x̂ = x * rstd,  y = x̂ * w
    dx = rstd * (dy*w - x̂ * mean(dy*w * x̂)),   dw = Σ_rows dy * x̂
"""
from __future__ import annotations

import torch
from torch import Tensor

from .runtime import next_power_of_2, tl, triton, triton_usable  # triton, or a stand-in without it


@triton.jit
def _rmsnorm_forward(X, R, Y, H, W, RSTD, x_row, x_col, r_row, r_col, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # this program's row (token)
    cols = tl.arange(0, BLOCK)  # a block of column offsets, padded up to a power of two...
    mask = cols < n_cols  # ...and the mask that switches off the padding lanes
    h = tl.load(X + row * x_row + cols * x_col, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + row * r_row + cols * r_col, mask=mask, other=0.0).to(tl.float32)
        h = h.to(H.dtype.element_ty).to(tl.float32)  # round like the eager `x + r` in the model's dtype
        tl.store(H + row * n_cols + cols, h.to(H.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)  # padding lanes are 0: they add nothing
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_backward(DY, H, W, RSTD, DX, DH, DW_PARTIAL, n_rows, n_cols,
                      HAS_DH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)  # this program's share of dw, summed over its rows
    for row in range(pid, n_rows, n_programs):  # rows pid, pid + n_programs, ...
        dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.load(H + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        dyw = dy * w
        dx = rstd * (dyw - xhat * (tl.sum(dyw * xhat, axis=0) / n_cols))
        if HAS_DH:  # the residual sum h was also an output: its gradient adds to the input's
            dx += tl.load(DH + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _warps(n_cols: int) -> int:
    """More threads for wider rows (one block holds a whole row): 4 warps up to 1024 columns, up to 16."""
    return min(16, max(4, next_power_of_2(n_cols) // 256))


def _rows(t: Tensor) -> Tensor:
    """(..., D) -> (N, D), a view whenever the leading dims can be merged (strides are passed to the kernel)."""
    return t.reshape(-1, t.shape[-1])


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None):
        shape, D = x.shape, x.shape[-1]
        x2 = _rows(x)
        r2 = _rows(residual) if residual is not None else x2
        N = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(N, D, dtype=out_dtype, device=x.device)
        h = torch.empty(N, D, dtype=x.dtype, device=x.device) if residual is not None else x2
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        _rmsnorm_forward[(N,)](x2, r2, y, h, weight, rstd, x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1),
                               D, eps, HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(D),
                               num_warps=_warps(D))
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.has_residual = shape, residual is not None
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor, dh: Tensor | None = None):
        h, weight, rstd = ctx.saved_tensors
        N, D = rstd.shape[0], ctx.shape[-1]
        if not h.is_contiguous():
            h = h.contiguous()
        dy = dy.reshape(N, D).contiguous()
        if dh is not None:
            dh = dh.reshape(N, D).contiguous()
        dx = torch.empty(N, D, dtype=h.dtype, device=h.device)
        n_programs = min(N, 4 * torch.cuda.get_device_properties(h.device).multi_processor_count) \
            if h.is_cuda else min(N, 4)
        dw_partial = torch.empty(n_programs, D, dtype=torch.float32, device=h.device)
        _rmsnorm_backward[(n_programs,)](dy, h, weight, rstd, dx, dh if dh is not None else dy, dw_partial, N, D,
                                         HAS_DH=dh is not None, BLOCK=next_power_of_2(D), num_warps=_warps(D))
        dw = dw_partial.sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        return dx, dw, None, (dx if ctx.has_residual else None)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """The same function in PyTorch (core's RMSNorm): the fallback, and the tests' oracle."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight
    return y if residual is None else (y, h)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5, residual: Tensor | None = None):
    """RMSNorm of ``x`` (or of ``x + residual``, returning ``(y, x + residual)``) with a Triton kernel when one can
    run on ``x``'s device, else in PyTorch. x: (..., D), weight: (D,)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if not triton_usable(x.device):
        return rms_norm_reference(x, weight, eps, residual)
    return RMSNormFunction.apply(x, weight, eps, residual)
