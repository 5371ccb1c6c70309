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

``SinkKVCache`` holds the slots, ``streaming_forward`` runs the model on new tokens through it (reusing the
model's own embedding, norms, projections and feed-forwards), ``streaming_generate`` decodes, and
``StreamingChat`` keeps one cache across the turns of a conversation (what ``apps/chat.py --streaming`` uses).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minllama.core.generate import sample
from minllama.core.model import MinimalLlama, apply_rope


class SinkKVCache:
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
        ref = model.tok_embeddings.weight
        shape = (batch_size, cfg.n_kv_heads, n_sink + window, cfg.head_dim)
        dtype = dtype or ref.dtype
        self.k = [torch.zeros(shape, dtype=dtype, device=ref.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=ref.device) for _ in model.layers]
        self.n_sink, self.window, self.capacity = n_sink, window, n_sink + window
        self.length = 0
        self.n_evicted = 0

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

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def _sink_attention(attn, x: Tensor, cache: SinkKVCache, layer: int, rope: Tensor, start: int) -> Tensor:
    """The model's own attention weights, with the rolling cache: x (B, c, dim) are the new tokens at slots
    start .. start + c - 1; rope (start + c, head_dim/2, 2) are the positions of every filled slot."""
    B, c, _ = x.shape
    end = start + c
    q = attn.wq(x).view(B, c, attn.n_heads, attn.head_dim)  # (B, c, n_heads, head_dim)
    k = attn.wk(x).view(B, c, attn.n_kv_heads, attn.head_dim)
    v = attn.wv(x).view(B, c, attn.n_kv_heads, attn.head_dim)
    cache.k[layer][:, :, start:end] = k.transpose(1, 2).to(cache.k[layer].dtype)  # stored unrotated
    cache.v[layer][:, :, start:end] = v.transpose(1, 2).to(cache.v[layer].dtype)
    q = apply_rope(q, rope[start:end]).transpose(1, 2)  # (B, n_heads, c, head_dim)
    keys = apply_rope(cache.k[layer][:, :, :end].transpose(1, 2), rope).transpose(1, 2)  # (B, n_kv, end, hd)
    values = cache.v[layer][:, :, :end]
    if c == 1:  # one new token sees every filled slot
        mask, causal = None, False
    elif start == 0:
        mask, causal = None, True
    else:  # new token j (slot start + j) sees slots 0 .. start + j
        slots = torch.arange(end, device=x.device)
        mask, causal = slots[None, :] <= (start + torch.arange(c, device=x.device))[:, None], False
    y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, is_causal=causal,
                                       enable_gqa=attn.n_kv_heads != attn.n_heads)  # (B, n_heads, c, head_dim)
    return attn.wo(y.transpose(1, 2).reshape(B, c, -1))


@torch.no_grad()
def streaming_forward(model: MinimalLlama, cache: SinkKVCache, tokens: Tensor) -> Tensor:
    """Run ``tokens`` (B, c) through the model on top of ``cache`` -> logits (B, c, vocab); the cache advances.

    The same computation as ``MinimalLlama.forward`` (embedding, pre-norm blocks, final norm, head), with the
    attention reading the rolling cache and positions given by cache slots."""
    B, c = tokens.shape
    cache.make_room(c)
    start = cache.length
    rope = model.rope[:start + c]  # positions 0 .. start + c - 1: always inside the trained range
    h = model.tok_embeddings(tokens)  # (B, c, dim)
    for i, layer in enumerate(model.layers):
        h = h + _sink_attention(layer.attention, layer.attention_norm(h), cache, i, rope, start)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    cache.length = start + c
    return model.output(model.norm(h))


def prefill(model: MinimalLlama, cache: SinkKVCache, tokens: Sequence[int], chunk: int | None = None) -> Tensor:
    """Feed a prompt of any length in chunks that fit the window; returns the logits of its last token (B, vocab)."""
    if len(tokens) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    device = model.tok_embeddings.weight.device
    chunk = min(chunk or cache.window, cache.window)
    ids = torch.tensor([list(tokens)], device=device)
    for i in range(0, ids.shape[1], chunk):
        logits = streaming_forward(model, cache, ids[:, i:i + chunk])
    return logits[:, -1]


@torch.no_grad()
def streaming_generate(model: MinimalLlama, prompt: Sequence[int], max_new_tokens: int, *, n_sink: int = 4,
                       window: int = 1020, cache: SinkKVCache | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
                       generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids after ``prompt``, with memory fixed at ``n_sink + window`` slots
    however long prompt and answer are. Stops after a token in ``stop_ids`` (which is yielded).
    Pass ``cache`` to continue a conversation on an existing cache (``prompt`` = only the new tokens)."""
    cache = cache or SinkKVCache(model, n_sink, window)
    stop = set(stop_ids)
    logits = prefill(model, cache, prompt)
    device = logits.device
    for i in range(max_new_tokens):
        token = int(sample(logits, temperature, top_k, top_p, generator)[0])
        yield token
        if token in stop or i == max_new_tokens - 1:
            return
        logits = streaming_forward(model, cache, torch.tensor([[token]], device=device))[:, -1]


class StreamingChat:
    """One rolling cache for a whole conversation: each turn feeds only the tokens the cache has not seen yet.

    ``history`` is every token fed to the cache so far (prompts and answers). A new prompt (the whole dialog, as
    ``chat_format.encode_dialog`` gives it) is compared with the history and the shared prefix is skipped. If they
    disagree earlier (an answer re-tokenized differently, or cut by the token budget), a cache that has not evicted
    anything is cut back to the shared prefix; once tokens have rolled out that is impossible, so the rest of the
    prompt is fed as is and from then on the history follows the prompt's tokenization.
    """

    def __init__(self, model: MinimalLlama, n_sink: int = 4, window: int = 1020):
        self.model = model
        self.cache = SinkKVCache(model, n_sink, window)
        self.history: list[int] = []

    def _new_tokens(self, prompt: Sequence[int]) -> list[int]:
        prompt = list(prompt)
        common = 0
        for a, b in zip(self.history, prompt):
            if a != b:
                break
            common += 1
        if common < len(self.history) and self.cache.n_evicted == 0:
            self.cache.length = common  # nothing rolled out yet: slot i still holds token i
        new = prompt[common:]
        if not new:
            raise ValueError("the prompt adds nothing to the conversation; append a user message first")
        self.history = prompt
        return new

    @torch.no_grad()
    def stream_text(self, tokenizer, prompt: Sequence[int], max_new_tokens: int, *, on_token=None,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None) -> Iterator[str]:
        """Like ``minllama.core.generate.stream_text``: yield the answer as text pieces, stop at the tokenizer's
        stop ids (not printed). The memory stays at ``n_sink + window`` slots however long the chat goes on."""
        from minllama.core.tokenizer_base import StreamDecoder

        decoder, stop = StreamDecoder(tokenizer), set(tokenizer.stop_ids)
        logits = prefill(self.model, self.cache, self._new_tokens(prompt))
        for i in range(max_new_tokens):
            t = int(sample(logits, temperature, top_k, top_p, generator)[0])
            if on_token is not None:
                on_token(t)
            if t in stop:
                break
            yield decoder.push(t)
            if i < max_new_tokens - 1:  # feed it: the history is exactly what the cache has seen
                logits = streaming_forward(self.model, self.cache, torch.tensor([[t]], device=logits.device))[:, -1]
                self.history.append(t)
        yield decoder.flush()

    def reset(self) -> None:
        self.cache = SinkKVCache(self.model, self.cache.n_sink, self.cache.window)
        self.history = []
