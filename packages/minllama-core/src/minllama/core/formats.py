"""What the three checkpoint formats look like: tensor names, configs and the rotary layout of q/k.

MinimalLlama uses Meta's names and Meta's rotary layout, so a Meta checkpoint needs no translation at all.

* **HF** (``transformers``) renames every tensor and, because its RoPE rotates the two *halves* of a head
  (``rotate_half``) instead of adjacent channel pairs, it stores the rows of ``wq``/``wk`` permuted: Meta row pair
  (2i, 2i+1) of each head becomes HF rows (i, i + head_dim/2). ``hf_to_meta_rows`` undoes this on load.
* **GGUF** (llama.cpp) renames every tensor but keeps Meta's interleaved layout: llama.cpp's ``convert_hf_to_gguf``
  permutes HF q/k *back*, because llama.cpp's llama RoPE also rotates adjacent pairs. Nothing to undo (checked
  numerically against transformers' own GGUF loader in ``tests/test_hf_parity.py``).

This module is pure bookkeeping; reading and writing files is in ``checkpoint.py``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from .config import LlamaConfig, RopeScaling
from .model import rope_frequencies


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message says what is wrong and what to do about it."""


# ----------------------------------------------------------------------------------------------------- names
# Per-layer names: ours (Meta) -> HF -> GGUF. "{}" is the layer index.
_LAYER_NAMES = [
    ("attention.wq.weight", "self_attn.q_proj.weight", "attn_q.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight", "attn_k.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight", "attn_v.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight", "ffn_down.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight", "ffn_up.weight"),
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
]
_GLOBAL_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
]
_HF, _GGUF = 1, 2
_LAYER_PREFIX = {_HF: "model.layers.{}.", _GGUF: "blk.{}."}
_LAYER_RE = {_HF: re.compile(r"model\.layers\.(\d+)\.(.+)"), _GGUF: re.compile(r"blk\.(\d+)\.(.+)")}


def _to_ours(name: str, fmt: int) -> str | None:
    for row in _GLOBAL_NAMES:
        if name == row[fmt]:
            return row[0]
    m = _LAYER_RE[fmt].fullmatch(name)
    if m:
        for row in _LAYER_NAMES:
            if m.group(2) == row[fmt]:
                return f"layers.{m.group(1)}.{row[0]}"
    return None  # not a weight of ours: the caller reports it as unexpected


def _from_ours(name: str, fmt: int) -> str:
    for row in _GLOBAL_NAMES:
        if name == row[0]:
            return row[fmt]
    _, i, rest = name.split(".", 2)
    for row in _LAYER_NAMES:
        if rest == row[0]:
            return _LAYER_PREFIX[fmt].format(i) + row[fmt]
    raise KeyError(name)


def hf_to_ours(name: str) -> str | None:
    return _to_ours(name, _HF)


def ours_to_hf(name: str) -> str:
    return _from_ours(name, _HF)


def gguf_to_ours(name: str) -> str | None:
    return _to_ours(name, _GGUF)


def ours_to_gguf(name: str) -> str:
    return _from_ours(name, _GGUF)


# Tensors some writers add that carry no weights of ours.
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")
META_IGNORED = {"rope.freqs"}
GGUF_IGNORED = {"rope_freqs.weight"}  # Llama 3.1 rope factors: read into the config instead

# ------------------------------------------------------------------------------------------- rotary layout
def meta_to_hf_rows(w: Tensor, n_heads: int) -> Tensor:
    """HF's ``permute`` (convert_llama_weights_to_hf.py): per head, rows (0,1),(2,3),.. -> halves [0,2,..|1,3,..]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``meta_to_hf_rows``: interleave each head's two halves back into channel pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -------------------------------------------------------------------------------------------------- HF config
_REQUIRED = object()


MAX_SIZE = 2 ** 31  # no size of a Llama (vocabulary, width, layers, heads, context) comes near it


def number(d: Mapping[str, Any], key: str, kind: type = int, default: Any = _REQUIRED, file: str = "config") -> Any:
    """``d[key]`` as a positive, finite int (below ``MAX_SIZE``) or float, or one CheckpointError naming the file
    and the field (a string, null, list, bool, 0, negative, NaN, inf or an absurd size where a size or a rate
    belongs: a damaged 2**62 would otherwise reach the allocator)."""
    if key not in d or (d[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise CheckpointError(f"{file} lacks the key {key!r}: not a Llama config (or a truncated file)")
        return default
    v = d[key]
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)  # 2048.0 written by some tools
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not 0 < v < (MAX_SIZE if kind is int else math.inf):
        want = f"a whole number in [1, 2^{MAX_SIZE.bit_length() - 1})" if kind is int else "a finite number > 0"
        raise CheckpointError(f"{file}: {key} is {v!r}, not {want}: re-download the file or fix that field")
    return kind(v)


def _mapping(d: Any, file: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{file} holds a JSON {type(d).__name__}, not an object: not a Llama config")
    return d


def build_config(file: str, **fields) -> LlamaConfig:
    """LlamaConfig(**fields), its own checks (heads that do not divide the width, ...) named by the file."""
    try:
        return LlamaConfig(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def config_from_hf(d: Mapping[str, Any], file: str = "config.json") -> LlamaConfig:
    """A transformers ``config.json`` (LlamaForCausalLM; v4 ``rope_theta``/``rope_scaling`` or v5
    ``rope_parameters``) -> LlamaConfig."""
    d = _mapping(d, file)
    if d.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{file} has model_type={d['model_type']!r}; only 'llama' checkpoints are supported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise CheckpointError(f"{file} sets {key}=true; MinimalLlama has no biases, use transformers")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file} has hidden_act={d['hidden_act']!r}; MinimalLlama only implements silu")
    rp = _mapping(d.get("rope_parameters") or {}, f"{file}: rope_parameters")
    scaling = _mapping(d.get("rope_scaling") or rp, f"{file}: rope_scaling")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        where = f"{file}: rope_scaling"
        rope_scaling = RopeScaling(factor=number(scaling, "factor", float, file=where),
                                   low_freq_factor=number(scaling, "low_freq_factor", float, file=where),
                                   high_freq_factor=number(scaling, "high_freq_factor", float, file=where),
                                   original_max_seq_len=number(scaling, "original_max_position_embeddings",
                                                               file=where))
    else:
        raise CheckpointError(f"{file} asks for rope scaling {rope_type!r}; only 'llama3' (Llama 3.1) is supported")
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{file}: tie_word_embeddings is {tie!r}, not true or false")
    n_heads = number(d, "num_attention_heads", file=file)
    return build_config(
        file, vocab_size=number(d, "vocab_size", file=file), dim=number(d, "hidden_size", file=file),
        n_layers=number(d, "num_hidden_layers", file=file), n_heads=n_heads,
        n_kv_heads=number(d, "num_key_value_heads", default=n_heads, file=file),
        hidden_dim=number(d, "intermediate_size", file=file),
        norm_eps=number(d, "rms_norm_eps", float, 1e-6, file),
        rope_theta=number(d, "rope_theta", float, number(rp, "rope_theta", float, 10000.0, file), file),
        rope_scaling=rope_scaling, max_seq_len=number(d, "max_position_embeddings", int, 2048, file),
        tie_embeddings=tie, head_dim=number(d, "head_dim", int, None, file),
        name=str(d.get("_name_or_path") or "custom"))


def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype | None = None) -> dict:
    """LlamaConfig -> a ``config.json`` that transformers' LlamaForCausalLM (v4 and v5) loads as is."""
    s = cfg.rope_scaling
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if s is None else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
    }
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# ------------------------------------------------------------------------------------------------ Meta config
def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width exactly as Meta's FeedForward computes it from params.json."""
    hidden_dim = int(2 * (4 * dim) / 3)  # 2/3 of 4*dim keeps the parameter count of a plain 4*dim MLP
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def _meta_ffn_params(dim: int, hidden_dim: int) -> dict:
    """multiple_of (and ffn_dim_multiplier if needed) from which ``meta_hidden_dim`` gives back ``hidden_dim``."""
    for multiple_of in (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_hidden_dim(dim, multiple_of, None) == hidden_dim:
            return {"multiple_of": multiple_of}
    multiple_of = next(m for m in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if hidden_dim % m == 0)
    base = int(2 * (4 * dim) / 3)
    for mult in (round(hidden_dim / base, 4), round(hidden_dim / base, 8), hidden_dim / base):
        if meta_hidden_dim(dim, multiple_of, mult) == hidden_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    return {"multiple_of": hidden_dim, "ffn_dim_multiplier": hidden_dim / base}  # always rounds up to hidden_dim


def config_from_meta(params: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None,
                     file: str = "params.json") -> LlamaConfig:
    """Meta ``params.json`` -> LlamaConfig. Meta does not store the vocabulary size (``-1`` in Llama 2) nor
    whether the head is tied: given the (merged) ``state_dict`` both are read from the weights."""
    params = _mapping(params, file)
    dim, n_heads = number(params, "dim", file=file), number(params, "n_heads", file=file)
    vocab_size = params.get("vocab_size", -1)
    tie = False
    if state_dict is not None:
        emb = state_dict["tok_embeddings.weight"]
        vocab_size = emb.shape[0] if vocab_size in (-1, None) else vocab_size
        out = state_dict.get("output.weight")
        tie = out is None or (out.shape == emb.shape and torch.equal(out, emb))  # Llama 3.2 stores a copy
    if vocab_size in (-1, None):
        raise CheckpointError(f"{file} has vocab_size -1: pass the weights (state_dict) to read it from them")
    vocab_size = number({"vocab_size": vocab_size}, "vocab_size", file=file)
    rope_scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1 / 3.2: llama-models' apply_scaling, factor 8 unless given
        rope_scaling = RopeScaling(factor=number(params, "rope_scaling_factor", float, 8.0, file),
                                   low_freq_factor=number(params, "low_freq_factor", float, 1.0, file),
                                   high_freq_factor=number(params, "high_freq_factor", float, 4.0, file),
                                   original_max_seq_len=number(params, "original_max_seq_len", int, 8192, file))
    default_len = 131072 if rope_scaling else 8192 if vocab_size >= 128000 else 4096
    multiplier = params.get("ffn_dim_multiplier")
    return build_config(
        file, vocab_size=vocab_size, dim=dim, n_layers=number(params, "n_layers", file=file), n_heads=n_heads,
        n_kv_heads=number(params, "n_kv_heads", int, n_heads, file),
        hidden_dim=meta_hidden_dim(dim, number(params, "multiple_of", int, 256, file),
                                   None if multiplier is None else number(params, "ffn_dim_multiplier", float,
                                                                          file=file)),
        norm_eps=number(params, "norm_eps", float, 1e-5, file), rope_theta=number(params, "rope_theta", float,
                                                                                  10000.0, file),
        rope_scaling=rope_scaling, max_seq_len=number(params, "max_seq_len", int, default_len, file),
        tie_embeddings=tie, head_dim=number(params, "head_dim", int, None, file))


def config_to_meta(cfg: LlamaConfig) -> dict:
    """LlamaConfig -> ``params.json``. Meta stores hidden_dim as (multiple_of, ffn_dim_multiplier): we pick values
    that give it back exactly. ``max_seq_len`` is stored too (llama-models reads it; Llama 2's loader does not)."""
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        raise CheckpointError(f"head_dim={cfg.head_dim} != dim/n_heads: Meta's params.json cannot express it; "
                              "use save_hf")
    p = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
         "vocab_size": cfg.vocab_size, **_meta_ffn_params(cfg.dim, cfg.hidden_dim), "norm_eps": cfg.norm_eps,
         "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
    s = cfg.rope_scaling
    if s is not None:
        p.update(use_scaled_rope=True, rope_scaling_factor=s.factor, high_freq_factor=s.high_freq_factor)
        if s.low_freq_factor != 1.0:
            p["low_freq_factor"] = s.low_freq_factor
        if s.original_max_seq_len != 8192:
            p["original_max_seq_len"] = s.original_max_seq_len
    return p


# ------------------------------------------------------------------------------------------------ GGUF config
def gguf_field(reader, key: str, default: Any = None) -> Any:
    """A metadata value of a ``gguf_file.GGUFFile`` (a Python str, int, float, bool or list; an array of strings is
    a ``StringArray``, a sequence decoded when read)."""
    return reader.fields.get(key, default)


def _f32(x: float) -> float:
    """GGUF stores floats as float32: 9.999999747378752e-06 -> 1e-05 (the same float32, the intended value)."""
    return float(str(np.float32(x)))


def config_from_gguf(reader, file: str = "GGUF file") -> LlamaConfig:
    """The ``{arch}.*`` metadata of a llama GGUF file -> LlamaConfig."""
    from .gguf_file import GGMLType

    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; only 'llama' GGUF files load "
                              "(SmolLM2, TinyLlama, Llama 2/3 convert to it)")
    meta = {key.removeprefix("llama."): gguf_field(reader, key) for key in reader.fields if key.startswith("llama.")}
    where = f"{file}: metadata llama."
    num = lambda key, kind=int, default=_REQUIRED: number(meta, key, kind, default, where)  # noqa: E731
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{file} has no token_embd.weight: an incomplete file")
    dim, n_heads = num("embedding_length"), num("attention.head_count")
    head_dim = num("attention.key_length", int, None) or dim // n_heads
    if num("rope.dimension_count", int, head_dim) != head_dim:
        raise CheckpointError(f"{file} rotates only {meta['rope.dimension_count']} of {head_dim} channels per head "
                              "(partial RoPE): not supported")
    vocab = num("vocab_size", int, None) or int(names["token_embd.weight"].shape[1])  # GGUF shapes: innermost first
    scaling_type = meta.get("rope.scaling.type") or "none"
    if scaling_type != "none":
        raise CheckpointError(f"{file}: rope scaling {scaling_type!r} is not supported (only Llama 3.1 rope_freqs)")
    rope_scaling = None
    if "rope_freqs.weight" in names:  # Llama 3.1: llama.cpp stores the per-pair divisors, not the parameters
        t = names["rope_freqs.weight"]
        if t.tensor_type != GGMLType.F32 or tuple(int(n) for n in t.shape) != (head_dim // 2,):
            raise CheckpointError(f"{file}: rope_freqs.weight is {t.tensor_type.name} of shape "
                                  f"{tuple(int(n) for n in t.shape)}, not F32 of ({head_dim // 2},) (one factor per "
                                  "rotated channel pair): a damaged file")
        factors = t.raw().view(torch.float32).flatten().clone()
        rope_scaling = RopeScaling(factor=float(factors.max()),
                                   original_max_seq_len=num("rope.scaling.original_context_length", int, 8192))
    cfg = build_config(
        file, vocab_size=int(vocab), dim=dim, n_layers=num("block_count"), n_heads=n_heads,
        n_kv_heads=num("attention.head_count_kv", int, n_heads), hidden_dim=num("feed_forward_length"),
        norm_eps=_f32(num("attention.layer_norm_rms_epsilon", float, 1e-5)),
        rope_theta=_f32(num("rope.freq_base", float, 10000.0)), rope_scaling=rope_scaling,
        max_seq_len=num("context_length", int, 2048), tie_embeddings="output.weight" not in names,
        head_dim=head_dim, name=str(gguf_field(reader, "general.name") or "custom"))
    if rope_scaling is not None:
        _check_rope_factors(cfg, factors)
    return cfg


def _check_rope_factors(cfg: LlamaConfig, factors: Tensor) -> None:
    """Our scaling must reproduce llama.cpp's rope_freqs (inv_freq / factors) or we would silently drift."""
    plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    if not torch.allclose(plain / factors, rope_frequencies(cfg), rtol=1e-4):
        raise CheckpointError("GGUF rope_freqs do not match Llama 3.1 scaling with factor "
                              f"{cfg.rope_scaling.factor}: unsupported rope scaling")
