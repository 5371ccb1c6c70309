"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without ever holding all the logits.

The output head of a Llama 3 (vocabulary 128,256) turns 8k tokens into 8k x 128k logits: 2 GiB in bf16, and as
much again (twice that in fp32) for their log-softmax and for their gradient: more than a layer's activations. We instead walk over the
tokens in chunks. For each chunk of C tokens:

    logits = h_c @ W.T                        (C, V): the only vocabulary-sized tensor, reused for its gradient
    kernel: loss_i, and dlogits overwriting logits in place  (softmax - target distribution) * scale_i
    grad_h[c] = dlogits @ W;   grad_W += dlogits.T @ h_c

so peak memory grows with C * V instead of N * V. With ``reduction`` 'mean' or 'sum' the loss is a scalar, so the
gradients are computed right away in the forward (its upstream gradient only rescales them); with 'none' each row
has its own upstream gradient, so the backward recomputes the chunks with those scales.

Loss of row i with label smoothing eps over V classes (PyTorch's definition), target y, logits z:
    loss_i = lse(z) - (1 - eps) z_y - eps/V * sum_j z_j,       dloss_i/dz_j = softmax(z)_j - (1 - eps)[j = y] - eps/V
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .runtime import next_power_of_2, tl, triton, triton_usable  # triton, or a stand-in without it


@triton.jit
def _cross_entropy_rows(LOGITS, TARGETS, SCALE, LOSS, stride, V, ignore_index, smoothing,
                        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    # Pass 1: log-sum-exp by online softmax, one running max and sum per lane (padding lanes stay at 0).
    m = tl.full((BLOCK,), -1e30, tl.float32)
    d = tl.zeros((BLOCK,), tl.float32)
    z_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=-1e30).to(tl.float32)
        m_new = tl.maximum(m, z)
        d = d * tl.exp(m - m_new) + tl.where(mask, tl.exp(z - m_new), 0.0)
        z_sum += tl.where(mask, z, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(d * tl.exp(m - m_row), axis=0))
    z_target = tl.load(z_row + tl.where(valid, target, 0)).to(tl.float32)
    loss = lse - (1.0 - smoothing) * z_target - smoothing / V * tl.sum(z_sum, axis=0)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        # Pass 2: overwrite the logits with the gradient, scaled by this row's upstream gradient (0 if ignored).
        scale = tl.where(valid, tl.load(SCALE + row), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - smoothing / V - tl.where(cols == target, 1.0 - smoothing, 0.0)
            tl.store(z_row + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _rows_triton(logits: Tensor, targets: Tensor, scale: Tensor | None, ignore_index: int, smoothing: float) -> Tensor:
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    _cross_entropy_rows[(C,)](logits, targets, scale if scale is not None else loss, loss, logits.stride(0), V,
                              ignore_index, smoothing, WRITE_GRAD=scale is not None,
                              BLOCK=min(4096 if logits.is_cuda else 1024, next_power_of_2(V)), num_warps=16)
    return loss


def _rows_torch(logits: Tensor, targets: Tensor, scale: Tensor | None, ignore_index: int, smoothing: float) -> Tensor:
    """The same per-chunk step in PyTorch: the fallback where Triton can't run (and the CPU memory test's path)."""
    V = logits.shape[1]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    loss = lse - (1 - smoothing) * z.gather(1, safe[:, None]).squeeze(1) - smoothing / V * z.sum(1)
    loss = torch.where(valid, loss, 0.0)
    if scale is not None:
        grad = z.sub_(lse[:, None]).exp_().sub_(smoothing / V)  # reuses z's memory
        grad.scatter_add_(1, safe[:, None], torch.full_like(grad[:, :1], smoothing - 1))
        grad.mul_(torch.where(valid, scale, 0.0)[:, None])
        logits.copy_(grad)
    return loss


def _chunks(n_rows: int, chunk_size: int):
    for start in range(0, n_rows, chunk_size):
        yield slice(start, min(start + chunk_size, n_rows))


def _forward_backward(h: Tensor, weight: Tensor, targets: Tensor, row_scale: Tensor | None, chunk_size: int,
                      ignore_index: int, smoothing: float, need_h: bool, need_w: bool, use_triton: bool):
    """Loss per row; and, when row_scale is given, the gradients of sum_i row_scale_i * loss_i."""
    rows = _rows_triton if use_triton else _rows_torch
    loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if row_scale is not None and need_h else None
    grad_w = torch.zeros_like(weight) if row_scale is not None and need_w else None
    for c in _chunks(h.shape[0], chunk_size):
        logits = h[c] @ weight.T  # (C, V): the only vocabulary-sized tensor
        loss[c] = rows(logits, targets[c], row_scale[c] if row_scale is not None else None, ignore_index, smoothing)
        if grad_h is not None:  # logits now hold dloss/dlogits
            torch.matmul(logits, weight, out=grad_h[c])
        if grad_w is not None:
            grad_w.addmm_(logits.T, h[c])
    return loss, grad_h, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                smoothing: float, chunk_size: int, use_triton: bool, grad_enabled: bool):
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        n_valid = (targets != ignore_index).sum()
        ctx.args = (chunk_size, ignore_index, smoothing, need_h, need_w, use_triton)
        ctx.reduction = reduction
        scale = None
        if reduction != "none" and (need_h or need_w):  # scalar loss: every row's gradient is known now
            per_row = 1.0 / n_valid.clamp(min=1) if reduction == "mean" else torch.ones((), device=h.device)
            scale = per_row.float().expand(h.shape[0]).contiguous()
        loss, grad_h, grad_w = _forward_backward(h, weight, targets, scale, *ctx.args[:3], need_h, need_w, use_triton)
        if reduction == "none":
            ctx.save_for_backward(h, weight, targets)
            return loss
        ctx.save_for_backward(grad_h, grad_w)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total  # mean over 0 valid rows is nan, as in PyTorch

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.reduction == "none":
            h, weight, targets = ctx.saved_tensors
            chunk_size, ignore_index, smoothing, need_h, need_w, use_triton = ctx.args
            _, grad_h, grad_w = _forward_backward(h, weight, targets, grad_out.float().contiguous(), chunk_size,
                                                  ignore_index, smoothing, need_h, need_w, use_triton)
        else:
            grad_h, grad_w = ctx.saved_tensors  # computed in the forward for an upstream gradient of 1
            for grad in (grad_h, grad_w):
                if grad is not None:
                    grad.mul_(grad_out)  # in place: a copy of grad_w would be another (vocab, dim) tensor
        return grad_h, grad_w, None, None, None, None, None, None, None


def default_chunk_size(n_rows: int, dim: int, vocab: int) -> int:
    """Tokens per chunk such that one chunk of logits (C, V) is about as big as the hidden states (N, dim)."""
    return max(1, min(n_rows, math.ceil(n_rows * dim / vocab)))


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: int | None = None, use_triton: bool | None = None) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ...)`` computed chunk by chunk, never materializing the
    (tokens, vocab) logits. hidden: (..., dim), weight: (vocab, dim), targets: (...) class indices.

    ``reduction='none'`` returns a loss per token with ``targets``' shape. ``use_triton`` defaults to whether a
    Triton kernel can run on ``hidden``'s device; otherwise each chunk's softmax step runs in PyTorch.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} needs targets of shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be (vocab, {hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fused_linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    V = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(f"fused_linear_cross_entropy: target {targets[bad][0].item()} is outside [0, {V}) and is "
                         f"not ignore_index={ignore_index}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(torch.int64).contiguous()
    chunk_size = chunk_size or default_chunk_size(h.shape[0], h.shape[1], V)
    use_triton = triton_usable(hidden.device) if use_triton is None else use_triton
    loss = LinearCrossEntropyFunction.apply(h, weight, t, ignore_index, reduction, float(label_smoothing),
                                            chunk_size, use_triton, torch.is_grad_enabled())
    return loss.view(targets.shape) if reduction == "none" else loss
