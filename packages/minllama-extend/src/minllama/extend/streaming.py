"""Streaming generation with attention sinks and a rolling KV cache (StreamingLLM, Xiao et al. 2023).

A plain KV cache grows by one entry per token: memory and time grow without bound, and past the trained context
the positions go out of range. A *sliding window* keeps only the last ``window`` entries, but quality collapses
the moment the first tokens are evicted: softmax attention must put its mass somewhere, and trained models park
the surplus on the first few tokens, whatever they are (the "attention sinks"). Keep those ``n_sink`` first
entries forever, roll the rest, and the model stays fluent over any length with ``n_sink + window`` slots:

    slots:  [ sink_0 .. sink_{n-1} | oldest ........ newest ]      positions 0 .. n_sink + window - 1

Positions are assigned *within the cache* (slot i is position i), never the token's index in the stream, so they
stay inside the trained range. Keys are therefore stored **unrotated** and rotated at read time by their current
slot: when the window rolls, every key moves one slot left and its rotation follows without rewriting anything.

``SinkKVCache`` is just another cache for core's model (``minllama.core.cache``): it keeps the eviction rule
(``reserve`` makes room) and the read-time rotation (``update``); everything else -- the forward pass, the decode
loop of ``minllama.core.generate``, any attention variant swapped into the model (Triton kernels, differential
attention) -- is core's. ``StreamingChat`` keeps one cache across the turns of a conversation (what
``apps/chat.py --streaming`` uses).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from minllama.core.cache import KVCache, attention_mask, storage_dtype
from minllama.core.generate import generate_stream
from minllama.core.model import MinimalLlama, apply_rope
from minllama.core.session import ChatSession


class SinkKVCache(KVCache):
    """``n_sink + window`` key/value slots per layer, preallocated once: memory never grows.

    k[layer], v[layer]: (B, n_kv_heads, n_sink + window, head_dim); keys are stored before rotation.
    ``length`` slots are filled; ``n_evicted`` counts the tokens that have rolled out of the window.
    """

    def __init__(self, model: MinimalLlama, n_sink: int = 4, window: int = 1020, batch_size: int = 1,
                 dtype: torch.dtype | None = None):
        cfg = model.config
        if n_sink < 0 or window < 1:
            raise ValueError(f"need n_sink >= 0 and window >= 1, got n_sink={n_sink}, window={window}")
        if n_sink + window > cfg.max_seq_len:
            raise ValueError(f"n_sink + window = {n_sink + window} slots exceed the model's context of "
                             f"{cfg.max_seq_len} positions; use a smaller window")
        ref = model.norm.weight
        self.model = model  # for its RoPE table, read at every step (rope scaling may replace it)
        self.n_sink, self.window, self.capacity = n_sink, window, n_sink + window
        self.max_chunk = window  # a longer prompt is fed in chunks (generate_stream does it)
        self.k, self.v = [], []
        for i, layer in enumerate(model.layers):  # each attention says what it stores per token
            assert layer.attention.layer_index == i, "layers must know their index (core's TransformerBlock)"
            n_kv_heads, head_dim = layer.attention.cache_shape()
            shape = (batch_size, n_kv_heads, self.capacity, head_dim)
            self.k.append(torch.zeros(shape, dtype=storage_dtype(model, dtype), device=ref.device))
            self.v.append(torch.zeros_like(self.k[-1]))
        self.length = 0
        self.n_evicted = 0

    def room(self, n_new: int) -> int:
        return n_new  # the window rolls: there is always room

    def rewind(self, n: int) -> bool:
        if self.n_evicted:  # slot i no longer holds token i
            return False
        self.length = min(self.length, n)
        return True

    def make_room(self, n: int) -> None:
        """Evict the oldest non-sink entries so that ``n`` more fit: the window part shifts left, sinks stay."""
        if n > self.window:
            raise ValueError(f"{n} tokens at once exceed the window of {self.window}; feed them in chunks")
        overflow = self.length + n - self.capacity
        if overflow <= 0:
            return
        s, end = self.n_sink, self.length
        for buf in (*self.k, *self.v):
            buf[:, :, s:end - overflow] = buf[:, :, s + overflow:end].clone()
        self.length -= overflow
        self.n_evicted += overflow

    def reserve(self, n: int, device=None) -> Tensor:
        """Make room for ``n`` new tokens; their positions are their slots, ``length .. length + n - 1``."""
        self.make_room(n)
        start, self.length = self.length, self.length + n
        return torch.arange(start, start + n, device=device)

    def plan(self, input_pos: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if pad is not None:
            raise ValueError("a rolling cache holds unpadded rows: stream one prompt at a time")
        # slot = position; a query sees the filled slots up to its own (the rest are masked)
        return input_pos, input_pos, attention_mask(input_pos, self.capacity, None)

    def update(self, attn, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
               slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new keys unrotated; rotate the queries at their slots and every key at its current slot.

        The rotation is core's ``apply_rope`` (a variant's own ``rotate``, e.g. a fused kernel, computes the same
        numbers; one that changes what RoPE means would need its own rolling cache)."""
        i = attn.layer_index
        self.k[i].index_copy_(2, slots, k.transpose(1, 2).to(self.k[i].dtype))  # (B, n_kv_heads, S, head_dim)
        self.v[i].index_copy_(2, slots, v.transpose(1, 2).to(self.v[i].dtype))
        q = apply_rope(q, rope).transpose(1, 2)  # (B, n_heads, c, head_dim)
        every_slot = self.model.rope[:self.capacity]  # slot i is position i
        keys = apply_rope(self.k[i].transpose(1, 2), every_slot).transpose(1, 2)
        return q, keys.to(q.dtype), self.v[i].to(q.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@torch.no_grad()
def streaming_forward(model: MinimalLlama, cache: SinkKVCache, tokens: Tensor) -> Tensor:
    """Run ``tokens`` (B, c) through the model on top of ``cache`` -> logits (B, c, vocab); the cache advances.
    It is the model's own forward: only the cache differs."""
    return model(tokens, cache.reserve(tokens.shape[1], tokens.device), cache=cache)


def streaming_generate(model: MinimalLlama, prompt: Sequence[int], max_new_tokens: int, *, n_sink: int = 4,
                       window: int = 1020, cache: SinkKVCache | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
                       generator: torch.Generator | None = None, compile: bool = False) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids after ``prompt``, with memory fixed at ``n_sink + window`` slots
    however long prompt and answer are. Stops after a token in ``stop_ids`` (which is yielded).
    Pass ``cache`` to continue a conversation on an existing cache (``prompt`` = only the new tokens).
    Core's ``generate_stream`` with a rolling cache."""
    cache = cache or SinkKVCache(model, n_sink, window)
    for token in generate_stream(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop_ids=stop_ids, generator=generator, compile=compile,
                                 cache=cache):
        yield int(token[0])


class StreamingChat(ChatSession):
    """``minllama.core.session.ChatSession`` on a rolling cache: one cache for a whole conversation, of bounded
    memory, each turn feeding only the tokens the cache has not seen. Once tokens have rolled out, a prompt that
    disagrees with the history cannot rewind: the rest of it is fed as is, and from then on the history follows the
    prompt's tokenization."""

    def __init__(self, model: MinimalLlama, n_sink: int = 4, window: int = 1020):
        super().__init__(model, lambda: SinkKVCache(model, n_sink, window))
