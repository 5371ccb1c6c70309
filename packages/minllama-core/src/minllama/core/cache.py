"""The KV cache: an object that generation creates and passes to the model, not state hidden in its modules.

Generating token t needs the keys and values of the t tokens before it. Recomputing them costs O(t²) over a
whole answer; caching them costs memory instead. A cache answers three questions, one method each:

    reserve(n)              host side, before a forward of n new tokens: make room, return their positions (n,)
    plan(input_pos, pad)    inside the forward: where the new keys go (slots), which slots each query sees (mask),
                            and the positions RoPE rotates them by
    update(attn, q, k, v, rope, slots)
                            inside each attention module: rotate, store the new keys/values, return every slot

*Slot* (where a key is stored) and *position* (what RoPE sees) are separate on purpose. In ``StaticKVCache`` they
are equal: token t sits in slot t. A rolling cache (``minllama.extend.streaming.SinkKVCache``) keeps positions
inside the trained range while slots are reused; a paged cache maps a sequence's positions onto blocks of slots
shared with other sequences. Each attention module says what it stores per token (``Attention.cache_shape``),
so a tensor-parallel rank (fewer heads) sizes its own cache with no special case.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # only for annotations: model.py imports this file
    from .model import Attention, MinimalLlama


def attention_mask(slots_q: Tensor, n_slots: int, pad: Tensor | None) -> Tensor | None:
    """Boolean mask (True = may attend), (1 or B, 1, T, S), for queries stored in ``slots_q`` (T,) over ``n_slots``
    key slots filled in order; None means plain causal attention (the fast path of scaled_dot_product_attention).

    ``pad`` (B,) counts the left padding of each row of a batch: those slots are hidden from the row's queries."""
    if pad is None and n_slots == slots_q.numel():
        return None
    slots = torch.arange(n_slots, device=slots_q.device)  # (S,)
    mask = slots[None, :] <= slots_q[:, None]  # (T, S): causal over slots
    if pad is not None:  # (B, T, S): hide each row's padding; a padding query still sees itself (no NaN)
        mask = (mask & (slots >= pad[:, None, None])) | (slots == slots_q[:, None])
    return mask.view(-1, 1, *mask.shape[-2:])


def storage_dtype(model: MinimalLlama, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a new cache keeps keys and values in: ``dtype`` if given, else the model's ``kv_cache_dtype``
    when set, else the dtype the model computes in. Storing them narrower than the model computes (bf16 keys for an
    fp32 or quantized model, as llama.cpp keeps F16 ones by default) halves the cache: they are rounded once when
    written and read back in the compute dtype."""
    return dtype or getattr(model, "kv_cache_dtype", None) or model.norm.weight.dtype


def positions_of(input_pos: Tensor, pad: Tensor | None) -> Tensor:
    """The RoPE position of each new token: its index after the row's left padding. (T,) or (B, T)."""
    return input_pos if pad is None else (input_pos[None, :] - pad[:, None]).clamp(min=0)


class KVCache:
    """The interface every cache implements (see the module docstring); ``StaticKVCache`` is the usual one."""

    length: int = 0  # tokens of each row the cache holds (the next position to write)
    capacity: int = 0  # slots per row: a forward may attend to at most this many tokens

    def room(self, n_new: int) -> int:
        """How many of ``n_new`` more tokens fit (a rolling cache: all of them)."""
        return max(0, min(n_new, self.capacity - self.length))

    def reserve(self, n: int, device=None) -> Tensor:
        raise NotImplementedError

    def rewind(self, n: int) -> bool:
        """Forget everything after the first ``n`` tokens (a chat whose history changed); False if impossible."""
        return False

    def plan(self, input_pos: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def update(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
               slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


class StaticKVCache(KVCache):
    """Keys and values preallocated for ``max_len`` tokens per row; token t is written in slot t.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim), keys stored rotated. No tensor ever changes size and
    the writes are in place (``index_copy_``), which is what lets ``torch.compile`` build the decode step once.
    """

    def __init__(self, model: MinimalLlama, batch_size: int, max_len: int | None = None, dtype=None):
        max_len = max_len or model.config.max_seq_len
        if not 0 < max_len <= model.config.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens does not fit the model's context of "
                             f"{model.config.max_seq_len}")
        # the norm's weight: a plain parameter even when other modules are quantized or wrapped
        dtype, device = storage_dtype(model, dtype), model.norm.weight.device
        self.k, self.v = [], []  # indexed by layer_index
        for i, layer in enumerate(model.layers):  # each module's own shape: a tensor-parallel rank has fewer heads
            assert layer.attention.layer_index == i, "layers must know their index (core's TransformerBlock)"
            n_kv_heads, head_dim = layer.attention.cache_shape()
            self.k.append(torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros_like(self.k[-1]))
        self.batch_size, self.capacity, self.length = batch_size, max_len, 0

    def reserve(self, n: int, device=None) -> Tensor:
        if self.length + n > self.capacity:
            raise ValueError(f"{self.length} cached + {n} new tokens exceed the cache of {self.capacity}: "
                             "make a larger cache (at most the model's context)")
        start, self.length = self.length, self.length + n
        return torch.arange(start, start + n, device=device)

    def rewind(self, n: int) -> bool:
        self.length = min(self.length, n)  # slots past it are masked until they are overwritten
        return True

    def resized(self, max_len: int, model) -> StaticKVCache:
        """A cache of another length holding the same first ``length`` tokens (a conversation outgrew it)."""
        other = StaticKVCache(model, self.batch_size, max_len, dtype=self.k[0].dtype)
        n = min(self.length, max_len)
        for src, dst in zip((*self.k, *self.v), (*other.k, *other.v)):
            dst[:, :, :n] = src[:, :, :n]
        other.length = n
        return other

    visible: int | None = None  # the slots the current forward attends over (set by plan; None: all)

    def plan(self, input_pos: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        # One new token, or inside torch.compile: every slot, filled or not (masked), so that no shape ever changes
        # and the compiled decode step never recompiles (a pure function of its tensors). Several new tokens in
        # eager mode (a prompt): only the slots up to the last of them, all that any of their queries may see.
        # From position 0 without padding that is plain causal attention (mask None): SDPA's fast path, where a
        # masked pass over the whole cache (a long chat's cache has thousands of slots) would do several times the work.
        self.visible = self.capacity
        if input_pos.numel() > 1 and not torch.compiler.is_compiling():
            self.visible = int(input_pos.max()) + 1
        return positions_of(input_pos, pad), input_pos, attention_mask(input_pos, self.visible, pad)

    def update(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
               slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, n_heads, head_dim), k, v (B, T, n_kv_heads, head_dim) of the new tokens -> q rotated, and the
        keys and values of every slot, all head-major: (B, heads, T or S, head_dim)."""
        q, k = attn.rotate(q, k, rope)
        k_all, v_all = self.k[attn.layer_index], self.v[attn.layer_index]
        k_all.index_copy_(2, slots, k.transpose(1, 2).to(k_all.dtype))  # in place: the buffers never change
        v_all.index_copy_(2, slots, v.transpose(1, 2).to(v_all.dtype))
        n = self.visible  # (plan's)
        # read back in q's dtype: a no-op, unless the cache stores fewer bits than the model computes with
        return q.transpose(1, 2), k_all[:, :, :n].to(q.dtype), v_all[:, :, :n].to(q.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
