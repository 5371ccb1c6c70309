"""What an adapter needs from the module it wraps: the *Linear-like* protocol.

An adapter never looks inside its base module. It needs three things, all duck-typed so that a quantized Linear from
another package (4-bit, 8-bit, GGUF blocks...) works without this package importing it:

- ``base(x)`` computes ``x @ W.T (+ bias)``: ``x`` (..., in_features) -> (..., out_features);
- the dense weight ``W`` (out_features, in_features), for DoRA (its row norms) and for merging: the module's
  ``dequantize()`` method if it has one (a quantized module stores packed integers, not ``W``), else its ``weight``;
- its shape: ``in_features``/``out_features`` attributes, else the dense weight's shape.

A plain ``nn.Linear`` satisfies the protocol as is. A quantized module only has to add ``dequantize()``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def dense_weight(module: nn.Module) -> Tensor:
    """The base module's weight as a dense floating-point (out_features, in_features) tensor."""
    if callable(getattr(module, "dequantize", None)):
        w = module.dequantize()
    else:
        w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2 or not w.is_floating_point():
        raise TypeError(f"{type(module).__name__} is not Linear-like: an adapter needs a `dequantize()` method or a "
                        "floating-point `weight` of shape (out_features, in_features)")
    return w


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear-like module, without dequantizing when it says so itself."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    with torch.no_grad():
        return tuple(dense_weight(module).shape)


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear and for any module that follows the protocol above."""
    if isinstance(module, nn.Linear):
        return True
    has_weight = callable(getattr(module, "dequantize", None)) or isinstance(getattr(module, "weight", None), Tensor)
    return has_weight and callable(getattr(module, "forward", None))


def base_bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None
