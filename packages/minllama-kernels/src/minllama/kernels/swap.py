"""Put the kernels into a MinimalLlama from outside: core never imports this package.

Each matching module gets its class swapped in place (``module.__class__ = KernelRMSNorm``): a subclass that
only overrides ``forward``. Parameters, buffers, the KV cache, hooks and ``state_dict`` keys stay exactly the
same, so optimizers, checkpoints and ``remove`` keep working. Only modules whose class is *exactly* core's are
swapped: a subclass from another package (LoRA, quantization, ...) has its own forward that we must not replace.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from minllama.core.model import Attention, FeedForward, MinimalLlama, RMSNorm, TransformerBlock

from .cross_entropy import fused_linear_cross_entropy
from .decode_attention_kernel import decode_attention
from .rmsnorm import rms_norm
from .rope import rope_qk
from .runtime import triton_usable
from .swiglu_kernel import swiglu


class KernelRMSNorm(RMSNorm):
    """RMSNorm by the Triton kernel; ``norm(x, residual=r)`` returns ``(norm(x + r), x + r)`` from one kernel."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class KernelAttention(Attention):
    """Core's attention with two steps replaced: q and k rotated by one fused RoPE launch, and the decode kernel
    for a single new token over the KV cache. Projections, the cache and the output are core's."""

    def rotate(self, q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        return rope_qk(q, k, rope)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if q.shape[2] == 1 and k.shape[2] > 1:  # one new token over the cache: the decode kernel
            return decode_attention(q, k, v, mask)
        return super().attend(q, k, v, mask)


class KernelFeedForward(FeedForward):
    """w2(swiglu(w1 x, w3 x)) with the fused SwiGLU kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class KernelTransformerBlock(TransformerBlock):
    """The block with the second residual add fused into ffn_norm: one kernel computes x + attn and its norm."""

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, cache=None,
                slots: Tensor | None = None) -> Tensor:
        attn = self.attention(self.attention_norm(x), rope, mask, cache, slots)
        normed, x = self.ffn_norm(attn, residual=x)  # x <- x + attn, normed = ffn_norm(x + attn)
        return x + self.feed_forward(normed)


SWAPS = {RMSNorm: KernelRMSNorm, Attention: KernelAttention, FeedForward: KernelFeedForward}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def apply(model: MinimalLlama, *, rmsnorm: bool = True, rope: bool = True, swiglu: bool = True,
          fuse_residual: bool = True) -> MinimalLlama:
    """Swap the model's RMSNorm, Attention and FeedForward modules (and blocks, for the fused residual add) for
    kernel versions, in place, when Triton can run on the model's device; otherwise leave it untouched.
    Returns the model. ``remove(model)`` undoes it."""
    if not triton_usable(model_device(model)):
        return model
    wanted = {RMSNorm: rmsnorm, Attention: rope, FeedForward: swiglu}
    for module in model.modules():
        if wanted.get(type(module)):
            module.__class__ = SWAPS[type(module)]
    if rmsnorm and fuse_residual:
        for module in model.modules():
            if type(module) is TransformerBlock and type(module.ffn_norm) is KernelRMSNorm:
                module.__class__ = KernelTransformerBlock
    return model


def remove(model: MinimalLlama) -> MinimalLlama:
    """Give every swapped module its core class back."""
    originals = {KernelRMSNorm: RMSNorm, KernelAttention: Attention, KernelFeedForward: FeedForward,
                 KernelTransformerBlock: TransformerBlock}
    for module in model.modules():
        if type(module) in originals:
            module.__class__ = originals[type(module)]
    return model


def is_applied(model: MinimalLlama) -> bool:
    return any(isinstance(m, (KernelRMSNorm, KernelAttention, KernelFeedForward)) for m in model.modules())


def fused_loss(model: MinimalLlama, tokens: Tensor, targets: Tensor, ignore_index: int = -100,
               reduction: str = "mean", label_smoothing: float = 0.0, chunk_size: int | None = None) -> Tensor:
    """The training loss ``F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ...)``, computed with
    the fused linear cross-entropy on the model's final hidden states: the (B*T, vocab) logits never exist.

    Works with or without ``apply``. An output head that is not a plain bias-free ``nn.Linear`` (e.g. wrapped by
    LoRA or quantized) falls back to the ordinary logits + cross-entropy."""
    if type(model.output) is not nn.Linear or model.output.bias is not None:
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
        return loss.view(targets.shape) if reduction == "none" else loss
    hidden = model.hidden_states(tokens)  # (B, T, dim): everything but the head
    return fused_linear_cross_entropy(hidden, model.output.weight, targets, ignore_index=ignore_index, reduction=reduction,
                                      label_smoothing=label_smoothing, chunk_size=chunk_size)
