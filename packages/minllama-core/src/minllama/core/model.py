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

from .cache import KVCache, attention_mask, positions_of
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
    rope = rope.float().unsqueeze(-3)  # broadcast over heads
    if torch.compiler.is_compiling():  # Inductor writes no code for complex numbers: the same product, spelled out
        cos, sin = rope[..., 0], rope[..., 1]
        x0, x1 = xp[..., 0], xp[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)
    # A pair (x0, x1) is the complex number x0 + i x1, and rotating it by angle a is multiplying by cos a + i sin a:
    # (x0 cos - x1 sin) + i (x1 cos + x0 sin). One complex multiply is faster in eager PyTorch than those four real
    # products on every other element (SmolLM2, 512-token bf16 prompt: 6-14 ms of a 125-145 ms prefill, measured A/B)
    rotated = torch.view_as_complex(xp.contiguous()) * torch.view_as_complex(rope.contiguous())  # (pairs in place)
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: n_heads queries share n_kv_heads keys/values.

    ``forward`` is a composition of named steps, so that a variant overrides only the step it changes (a fused
    RoPE kernel overrides ``rotate``, a new attention map ``attend``) and never repeats the rest:

        project  x -> q, k, v          (B, T, heads, head_dim)
        rotate   RoPE on q and k       positions enter here, and only here
        cache    store k, v; read all  (the cache object, when there is one: it calls ``rotate`` itself)
        attend   softmax(q kᵀ/√d) v    (B, n_heads, T, head_dim)
        project_out  heads -> dim      (B, T, dim)
    """

    def __init__(self, cfg: LlamaConfig, layer_index: int = 0):
        super().__init__()
        self.layer_index = layer_index  # which cache entry is ours; some variants also depend on depth
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def cache_shape(self) -> tuple[int, int]:
        """(kv heads, channels per head) this module caches per token: a cache sizes itself from it."""
        return self.n_kv_heads, self.head_dim

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(q, rope), apply_rope(k, rope)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, n_heads, T, head_dim) over k, v (B, n_kv_heads, S, head_dim) -> (B, n_heads, T, head_dim)."""
        # GQA/MQA: query heads h*n_rep .. (h+1)*n_rep-1 all read kv head h (enable_gqa does it without copying k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def project_out(self, y: Tensor) -> Tensor:
        return self.wo(y.transpose(1, 2).flatten(2))  # (B, n_heads, T, head_dim) -> (B, T, dim)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None) -> Tensor:
        """x (B, T, dim). Without a cache, attend within x; with one, store the new keys/values at ``slots`` and
        attend to every slot the mask allows."""
        q, k, v = self.project(x)
        if cache is None:
            q, k = self.rotate(q, k, rope)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        else:
            q, k, v = cache.update(self, q, k, v, rope, slots)  # k, v: (B, n_kv_heads, S, head_dim), S slots
        return self.project_out(self.attend(q, k, v, mask))


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
    """Pre-norm residual block: each sub-layer reads a normalized copy of the stream and adds its result back.

    The sub-layers are built from classes (``attention_class``, ``feed_forward_class``: class attributes, or
    arguments), so a variant names its class instead of building a module and overwriting it."""

    attention_class = Attention
    feed_forward_class = FeedForward

    def __init__(self, cfg: LlamaConfig, layer_index: int = 0, attention_class: type | None = None,
                 feed_forward_class: type | None = None):
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = (attention_class or self.attention_class)(cfg, layer_index)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = (feed_forward_class or self.feed_forward_class)(cfg)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                slots: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, cache, slots)
        return x + self.feed_forward(self.ffn_norm(x))


class MinimalLlama(nn.Module):
    """The Llama decoder. ``model(tokens)`` -> logits (B, T, vocab).

    For generation, make a cache (``StaticKVCache(model, batch, max_len)``) and pass it: ``model(tokens,
    input_pos, cache=cache)`` writes the keys and values of ``tokens`` at positions ``input_pos`` and attends to
    every filled slot. ``pad`` (B,) counts the left padding of each row in a batch of prompts of different lengths:
    those slots are masked and the row's positions start at 0 after them, so each row computes exactly what it
    would alone.

    Made to be subclassed: name your own ``attention_class`` / ``feed_forward_class`` (or ``block_class``), or
    override any method below.
    """

    block_class = TransformerBlock
    attention_class: type | None = None  # None: the block's own (core's Attention)
    feed_forward_class: type | None = None
    # The dtype new KV caches store keys and values in (``cache.storage_dtype``); None: the model's own. E.g.
    # ``model.kv_cache_dtype = torch.bfloat16`` halves an fp32 or quantized model's cache, at the price of rounding
    # each key and value once (llama.cpp's default: F16 keys and values whatever the weights).
    kv_cache_dtype: torch.dtype | None = None

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block_class(cfg, i, self.attention_class, self.feed_forward_class)
                                    for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_cache(rope_frequencies(cfg), cfg.max_seq_len), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                last_only: bool = False, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only`` (prefill needs no more).

        ``input_pos`` (T,): the tokens' positions (default 0 .. T-1). Without ``cache`` this is a plain causal
        pass over ``tokens``; with one, their keys/values are stored and every earlier one is attended to."""
        h = self.hidden_states(tokens, input_pos, pad, cache=cache)  # (B, T, dim)
        return self.output(h[:, -1:] if last_only else h)  # (B, T, vocab)

    def hidden_states(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                      embeddings: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Everything but the head: the final normalized hidden states (B, T, dim). A loss that never builds the
        full (B, T, vocab) logits (a fused linear cross-entropy) starts from here. ``embeddings`` (B, T, dim), when
        given, replace the looked-up token embeddings (a model that embeds more than token ids, e.g. numbers)."""
        B, T = tokens.shape
        if input_pos is None:
            if cache is not None:
                raise ValueError("a forward with a cache needs input_pos, the new tokens' positions: "
                                 "take them from cache.reserve(n_tokens)")
            input_pos = torch.arange(T, device=tokens.device)
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"{T} tokens exceed the model's context of {self.config.max_seq_len}")
            positions, slots = positions_of(input_pos, pad), None
            mask = attention_mask(torch.arange(T, device=tokens.device), T, pad)
        else:
            positions, slots, mask = cache.plan(input_pos, pad)  # where the new keys go, what each query sees
        rope = self.rope[positions]  # (T or B, T, head_dim/2, 2)
        h = self.tok_embeddings(tokens) if embeddings is None else embeddings  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, rope, mask, cache, slots)
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
        self.reset_rope()

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE table from the config, on ``device`` (default: where the weights are). It is in no
        checkpoint (a non-persistent buffer): a model built on the meta device needs it after its weights arrive."""
        device = device or (self.rope.device if not self.rope.is_meta else self.norm.weight.device)
        self.rope = rope_cache(rope_frequencies(self.config), self.config.max_seq_len).to(device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once
