"""MinimalLlama: the whole Llama architecture in one file.

    tokens (B, T) -> embedding -> n_layers x [x + attention(norm(x)); x + feed_forward(norm(x))] -> norm -> head

Weights use Meta's names and Meta's rotary layout (channel pairs (0,1), (2,3), ... are rotated together), so a Meta
``consolidated.pth`` loads as is; ``checkpoint.py`` converts the HF and GGUF layouts on the way in and out.
Everything here is single-device and plain PyTorch: parallelism, quantization, adapters and kernels are applied
to a ``MinimalLlama`` from outside by swapping or wrapping its modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import LlamaConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Cheaper than LayerNorm (no mean, no bias) and just as stable for transformers."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # reduce in fp32 even when x is bf16: the mean of squares loses precision otherwise
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(cfg: LlamaConfig) -> Tensor:
    """The rotation speed of each channel pair: theta^(-2i/head_dim), i = 0 .. head_dim/2 - 1. (head_dim/2,)"""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context are stretched by `factor` (they never completed a
    # turn in training), short ones are kept (they encode local order), and the band between is blended.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_seq_len / s.low_freq_factor  # above this: fully scaled
    high_wavelen = s.original_max_seq_len / s.high_freq_factor  # below this: untouched
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def rope_cache(inv_freq: Tensor, seq_len: int) -> Tensor:
    """cos and sin of angle = position * frequency, for every position. (seq_len, head_dim/2, 2)"""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (seq_len, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate each channel pair (x0, x1) of every head by its position's angle.

    x: (B, T, n_heads, head_dim); rope: (T, head_dim/2, 2) or, per sequence, (B, T, head_dim/2, 2).
    After the rotation, q·k depends only on the *distance* between the two positions: that is RoPE's point.
    """
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, n_heads, head_dim/2, 2)
    rope = rope.unsqueeze(-3)  # broadcast over heads
    cos, sin = rope[..., 0], rope[..., 1]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of past positions: decoding token t then costs O(t), not O(t^2).

    The buffers have a fixed shape, and new entries are written in place at ``input_pos``: no tensor ever changes
    size, which is what lets ``torch.compile`` build the decode step once.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype=None, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: (B, n_kv_heads, T, head_dim) written at slots input_pos (T,)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: n_heads queries share n_kv_heads keys/values."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        """input_pos: the cache slots to write, or None for a plain pass that leaves the cache alone."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv_heads, S, head_dim), S = cache length
        # GQA/MQA: query heads h*n_rep .. (h+1)*n_rep-1 all read kv head h (enable_gqa does it without copying k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, n_heads, T, head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: each sub-layer reads a normalized copy of the stream and adds its result back."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class MinimalLlama(nn.Module):
    """The Llama decoder. ``model(tokens)`` -> logits (B, T, vocab).

    For generation, ``setup_cache(batch, max_len)`` first; then ``model(tokens, input_pos)`` writes the keys and
    values of ``tokens`` at cache slots ``input_pos`` and attends to every filled slot. ``pad`` (B,) counts the left
    padding of each row in a batch of prompts of different lengths: those slots are masked and the row's positions
    start at 0 after them, so each row computes exactly what it would alone.

    Made to be subclassed: override ``Attention``/``FeedForward`` via ``block_class``, or any method below.
    """

    block_class = TransformerBlock

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block_class(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_cache(rope_frequencies(cfg), cfg.max_seq_len), persistent=False)
        self.cache_len = 0  # 0: no KV cache

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> None:
        """Allocate a KV cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: the context)."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's context of {self.config.max_seq_len}")
        ref = self.norm.weight  # a plain parameter even when other modules are quantized or wrapped
        dtype = dtype or ref.dtype
        for layer in self.layers:  # the layer's own head count: a tensor-parallel rank holds only some heads
            layer.attention.kv_cache = KVCache(batch_size, layer.attention.n_kv_heads, max_len, self.config.head_dim,
                                               dtype=dtype, device=ref.device)
        self.cache_len = max_len

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_len = 0

    def attention_mask(self, slots_q: Tensor, n_slots: int, pad: Tensor | None) -> Tensor | None:
        """Boolean mask (True = may attend), (1 or B, 1, T, S) for queries in ``slots_q`` (T,) over ``n_slots``
        key slots; None means plain causal attention (the fast path of scaled_dot_product_attention)."""
        if pad is None and n_slots == slots_q.numel():
            return None
        slots = torch.arange(n_slots, device=slots_q.device)  # (S,)
        mask = slots[None, :] <= slots_q[:, None]  # (T, S): causal over slots
        if pad is not None:  # (B, T, S): hide each row's padding; a padding query still sees itself (no NaN)
            mask = (mask & (slots >= pad[:, None, None])) | (slots == slots_q[:, None])
        return mask.view(-1, 1, *mask.shape[-2:])

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only`` (prefill needs no more).

        The KV cache is used only when ``input_pos`` is given: ``model(tokens)`` is always a plain causal pass.
        """
        h = self.hidden_states(tokens, input_pos, pad)  # (B, T, dim)
        return self.output(h[:, -1:] if last_only else h)  # (B, T, vocab)

    def hidden_states(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                      embeddings: Tensor | None = None) -> Tensor:
        """Everything but the head: the final normalized hidden states (B, T, dim). A loss that never builds the
        full (B, T, vocab) logits (a fused linear cross-entropy) starts from here. ``embeddings`` (B, T, dim), when
        given, replace the looked-up token embeddings (a model that embeds more than token ids, e.g. numbers)."""
        B, T = tokens.shape
        use_cache = input_pos is not None and self.cache_len > 0
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if not use_cache and T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.max_seq_len}")
        positions = input_pos if pad is None else (input_pos[None, :] - pad[:, None]).clamp(min=0)  # (T,) | (B, T)
        rope = self.rope[positions]
        slots_q, n_slots = (input_pos, self.cache_len) if use_cache else (torch.arange(T, device=tokens.device), T)
        mask = self.attention_mask(slots_q, n_slots, pad)
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos if use_cache else None)
        return self.norm(h)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (also after building on the meta device and calling to_empty)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for layer in self.layers:  # scale the residual-branch outputs down with depth (GPT-2's trick)
            for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
                nn.init.normal_(w, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
        self.rope = rope_cache(rope_frequencies(self.config), self.config.max_seq_len).to(self.rope.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once
