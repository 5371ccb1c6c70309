"""SwiGLU's elementwise part: out = silu(gate) * up, silu(g) = g * sigmoid(g).

Eager PyTorch runs silu and the multiply as two kernels, writes silu(gate) to memory, and keeps it for the backward.
The fused kernel reads gate and up once, writes out once, and the backward *recomputes* sigmoid(gate) from the
saved inputs instead of storing it: one (tokens, hidden_dim) activation less per layer.

    d out / d up   = silu(g)
    d out / d gate = up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
"""
from __future__ import annotations

import torch
from torch import Tensor

from .runtime import next_power_of_2, tl, triton, triton_usable  # triton, or a stand-in without it


@triton.jit
def _swiglu_forward(G, U, OUT, g_row, g_col, u_row, u_col, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # this program's block of the row
    mask = cols < n_cols
    g = tl.load(G + row * g_row + cols * g_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row + cols * u_col, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + row * n_cols + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(DOUT, G, U, DG, DU, g_row, g_col, u_row, u_col, d_row, d_col, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * d_row + cols * d_col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_row + cols * g_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row + cols * u_col, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + row * n_cols + cols, (dout * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * n_cols + cols, (dout * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(1024, next_power_of_2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        g, u = _rows(gate), _rows(up)
        out = torch.empty(g.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        grid, block = _grid(*g.shape)
        _swiglu_forward[grid](g, u, out, *g.stride(), *u.stride(), g.shape[1], BLOCK=block)
        ctx.save_for_backward(gate, up)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout: Tensor):
        gate, up = ctx.saved_tensors
        g, u, d = _rows(gate), _rows(up), _rows(dout)
        dg = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(u.shape, dtype=up.dtype, device=up.device)
        grid, block = _grid(*g.shape)
        _swiglu_backward[grid](d, g, u, dg, du, *g.stride(), *u.stride(), *d.stride(), g.shape[1], BLOCK=block)
        return dg.view(gate.shape), du.view(up.shape)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """What core's FeedForward computes between its projections: the fallback and the tests' oracle."""
    return torch.nn.functional.silu(gate) * up


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up with a Triton kernel when one can run on the tensors' device, else in PyTorch."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if not triton_usable(gate.device):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
