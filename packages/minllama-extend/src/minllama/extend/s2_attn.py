"""Shifted sparse attention (S²-Attn, LongLoRA, Chen et al. 2023): train at long context for the cost of short.

Full causal attention over T tokens costs O(T²). S²-Attn cuts the sequence into groups of ``group_size`` tokens
and lets each token attend only inside its group: O(T * group_size). Alone, that would cut the sequence into
unrelated pieces; so **half of the heads see the groups shifted by half a group**, and their groups straddle the
borders of the others' groups - information crosses every border through them:

    heads 0 .. H/2-1:    [0  ..  G-1] [G  .. 2G-1] [2G .. 3G-1] ...
    heads H/2 .. H-1:  [.. G/2-1] [G/2 .. 3G/2-1] [3G/2 .. 5G/2-1] ...   (the last group wraps to the start)

Only training uses it: the weights stay those of a normal Llama, and inference runs plain full attention (the
model has learned to use long context through the shifted groups, and full attention generalizes from them).

Masking is causal by *original* position in every group, so the wrapped group (the last G/2 tokens with the first
G/2) never lets an early token see a later one (a causal mask over the rolled order would let the first G/2
tokens see the last ones).

``enable_s2_attn(model, group_size)`` switches every attention of a ``MinimalLlama`` to this class (the instance's
class changes; its weights, names and state dict stay the same, so checkpoints save and load as usual).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minllama.core.model import Attention, MinimalLlama


def s2_attention_mask(seq_len: int, group_size: int, n_heads: int, device=None) -> Tensor:
    """Boolean (n_heads, n_groups, G, G): True where query i may attend key j of the same group, for the grouped
    layout of ``shifted_sparse_attention`` (the shifted half of the heads is rolled by -G/2)."""
    pos = torch.arange(seq_len, device=device)
    shifted = pos.roll(-(group_size // 2))  # token at index i of a shifted head is at position shifted[i]
    masks = []
    for p in (pos, shifted):
        g = p.view(-1, group_size)  # (n_groups, G): the position held by each slot
        masks.append(g[:, None, :] <= g[:, :, None])  # (n_groups, G_q, G_k): causal by original position
    half = n_heads // 2
    return torch.cat([masks[0].expand(half, -1, -1, -1), masks[1].expand(n_heads - half, -1, -1, -1)])


def shifted_sparse_attention(q: Tensor, k: Tensor, v: Tensor, group_size: int) -> Tensor:
    """q, k, v: (B, H, T, head_dim), already rotated, k/v with as many heads as q -> (B, H, T, head_dim)."""
    B, H, T, D = q.shape
    if T % group_size or group_size % 2:
        raise ValueError(f"S²-Attn needs the sequence length ({T}) to be a multiple of an even group_size "
                         f"({group_size}); pad or crop the training sequences")
    half, shift = H // 2, group_size // 2

    def to_groups(x: Tensor) -> Tensor:  # shift half the heads, then (B, H, n_groups, G, D)
        x = torch.cat([x[:, :half], x[:, half:].roll(-shift, dims=2)], dim=1)
        return x.view(B, H, T // group_size, group_size, D)

    mask = s2_attention_mask(T, group_size, H, q.device)
    y = F.scaled_dot_product_attention(to_groups(q), to_groups(k), to_groups(v), attn_mask=mask)
    y = y.view(B, H, T, D)
    return torch.cat([y[:, :half], y[:, half:].roll(shift, dims=2)], dim=1)  # shift back


class ShiftedSparseAttention(Attention):
    """``Attention`` that uses S²-Attn for full training passes longer than one group; anything else (eval mode,
    the KV cache, padding masks, short inputs) is the normal attention."""

    group_size: int = 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        T = q.shape[2]  # q (B, n_heads, T, head_dim), k, v (B, n_kv_heads, S, head_dim)
        if not self.training or mask is not None or k.shape[2] != T or T <= self.group_size:
            return super().attend(q, k, v, mask)  # eval, the KV cache, padding masks, short inputs
        n_rep = q.shape[1] // k.shape[1]  # each query head gets its own copy of its kv head
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return shifted_sparse_attention(q, k, v, self.group_size)  # (B, n_heads, T, head_dim)


def enable_s2_attn(model: MinimalLlama, group_size: int) -> MinimalLlama:
    """Train ``model`` with S²-Attn in groups of ``group_size`` tokens (in place; returns the model)."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
    for layer in model.layers:
        if not isinstance(layer.attention, Attention):
            raise TypeError(f"layer attention is a {type(layer.attention).__name__}, not core's Attention: "
                            "enable S²-Attn before wrapping the attention modules")
        layer.attention.__class__ = ShiftedSparseAttention
        layer.attention.group_size = group_size
    return model


def disable_s2_attn(model: MinimalLlama) -> MinimalLlama:
    for layer in model.layers:
        if isinstance(layer.attention, ShiftedSparseAttention):
            layer.attention.__class__ = Attention
            del layer.attention.group_size
    return model
