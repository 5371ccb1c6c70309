"""RoPE scaling: run a model past the context it was trained on, by changing its rotary frequencies from outside.

RoPE rotates channel pair i of every query and key by the angle ``position * inv_freq[i]``. A model trained on
``L`` tokens has only seen angles up to ``L * inv_freq[i]``; past ``L`` the slow pairs (small ``inv_freq``) reach
angles they never saw and attention breaks down. Each method below changes ``inv_freq`` (and YaRN also the
attention temperature) so that a longer context maps back into angles the model knows:

    linear       inv_freq / s                             every pair slowed down: positions are "interpolated"
    ntk          base * s^(d/(d-2))                       fast pairs ~kept, slowest pair slowed by exactly s
    dynamic      ntk with s computed from the current length, only once it passes L (no change below L)
    yarn         per pair: slow pairs interpolated, fast pairs kept, a linear ramp between; cos/sin * mscale
    llama3       Llama 3.1's wavelength bands (the same idea as YaRN, with bands set by wavelength, no mscale)

``scale_rope(model, method, factor, original_max_seq_len)`` rebuilds the model's non-persistent ``rope`` buffer
(``(max_seq_len, head_dim/2, 2)`` cos/sin table, see ``minllama.core.model.rope_cache``) and grows
``model.config.max_seq_len``. Nothing inside the model changes: ``model(tokens)`` just reads a different table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minllama.core.config import RopeScaling
from minllama.core.model import MinimalLlama, rope_cache, rope_frequencies

METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3")


# --------------------------------------------------------------------------------------------- the frequencies
def base_frequencies(theta: float, head_dim: int) -> Tensor:
    """Unscaled RoPE: theta^(-2i/d) for i = 0 .. d/2 - 1. (head_dim/2,)"""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def linear_frequencies(theta: float, head_dim: int, factor: float) -> Tensor:
    """Position interpolation (Chen et al. 2023): position p behaves like p / factor, i.e. every frequency / factor.
    Cheap and robust, but the fast pairs that encode *local* order get ``factor`` times less resolution."""
    return base_frequencies(theta, head_dim) / factor


def ntk_theta(theta: float, head_dim: int, factor: float) -> float:
    """NTK-aware base (bloc97): theta' = theta * factor^(d/(d-2)). The slowest pair (i = d/2 - 1) is then slowed by
    exactly ``factor`` (like linear), while the fastest pair (i = 0) is untouched: resolution is kept where it is
    needed, and the stretching goes where the angles would have left the trained range."""
    return theta * factor ** (head_dim / (head_dim - 2))


def ntk_frequencies(theta: float, head_dim: int, factor: float) -> Tensor:
    return base_frequencies(ntk_theta(theta, head_dim, factor), head_dim)


def dynamic_ntk_factor(seq_len: int, original_max_seq_len: int, factor: float) -> float:
    """Dynamic NTK (emozilla): the NTK factor grows with the current length ``seq_len`` and is 1 up to the original
    context, so short inputs run exactly as the model was trained. ``factor`` sets the slope."""
    seq_len = max(seq_len, original_max_seq_len)
    return factor * seq_len / original_max_seq_len - (factor - 1)


def dynamic_ntk_frequencies(theta: float, head_dim: int, factor: float, seq_len: int,
                            original_max_seq_len: int) -> Tensor:
    return ntk_frequencies(theta, head_dim, dynamic_ntk_factor(seq_len, original_max_seq_len, factor))


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature: cos/sin are scaled by 0.1 ln(s) + 1, so logits q.k grow by its square. A longer
    context spreads attention over more keys (higher entropy); the sharper logits compensate."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_frequencies(theta: float, head_dim: int, factor: float, original_max_seq_len: int,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """YaRN (Peng et al. 2023), "NTK-by-parts": a pair that turns more than ``beta_fast`` times within the original
    context is kept as is (it has seen every angle), one that turns less than ``beta_slow`` times is interpolated by
    ``factor`` (like linear), and pairs in between are blended with a linear ramp over the pair index."""
    inv_freq = base_frequencies(theta, head_dim)

    def pair_index(turns: float) -> float:  # the (fractional) pair i whose frequency turns `turns` times in L tokens
        return head_dim * math.log(original_max_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: scale
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp


def llama3_frequencies(theta: float, head_dim: int, factor: float, original_max_seq_len: int,
                       low_freq_factor: float = 1.0, high_freq_factor: float = 4.0) -> Tensor:
    """Llama 3.1: the same rule core applies to Llama 3.1/3.2 checkpoints (``minllama.core.model.rope_frequencies``).
    Wavelengths longer than L / low_freq_factor are scaled, shorter than L / high_freq_factor kept, blended between."""
    from minllama.core.config import LlamaConfig

    cfg = LlamaConfig(dim=head_dim, n_heads=1, rope_theta=theta,
                      rope_scaling=RopeScaling(factor, low_freq_factor, high_freq_factor, original_max_seq_len))
    return rope_frequencies(cfg)


# --------------------------------------------------------------------------------------------- applying them
@dataclass(frozen=True)
class RopeScalingMethod:
    """Which scaling a model runs with (kept on the model as ``model.rope_scaling_method``)."""

    method: str
    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def frequencies(self, theta: float, head_dim: int, seq_len: int | None = None) -> Tensor:
        """inv_freq (head_dim/2,); ``seq_len`` is the current length (only dynamic NTK reads it)."""
        m, s, L = self.method, self.factor, self.original_max_seq_len
        if m == "linear":
            return linear_frequencies(theta, head_dim, s)
        if m == "ntk":
            return ntk_frequencies(theta, head_dim, s)
        if m == "dynamic":
            return dynamic_ntk_frequencies(theta, head_dim, s, seq_len or L, L)
        if m == "yarn":
            return yarn_frequencies(theta, head_dim, s, L, self.beta_fast, self.beta_slow)
        return llama3_frequencies(theta, head_dim, s, L, self.low_freq_factor, self.high_freq_factor)

    @property
    def attention_factor(self) -> float:
        """Multiplies cos and sin (so q.k by its square): only YaRN uses one."""
        return yarn_mscale(self.factor) if self.method == "yarn" else 1.0


def _rope_table(model: MinimalLlama, spec: RopeScalingMethod, seq_len: int | None = None) -> Tensor:
    cfg = model.config
    inv_freq = spec.frequencies(cfg.rope_theta, cfg.head_dim, seq_len)
    return (rope_cache(inv_freq, cfg.max_seq_len) * spec.attention_factor).to(model.rope.device)


def scale_rope(model: MinimalLlama, method: str, factor: float, original_max_seq_len: int | None = None,
               max_seq_len: int | None = None, **options) -> MinimalLlama:
    """Run ``model`` with a scaled RoPE (in place; returns the model).

    method: one of ``METHODS``; factor: the context extension (e.g. 4 to go from 2k to 8k tokens);
    original_max_seq_len: the context the model was trained on (default: its current ``max_seq_len``);
    max_seq_len: the new context (default ``factor * original``); options: ``beta_fast``/``beta_slow`` (yarn),
    ``low_freq_factor``/``high_freq_factor`` (llama3). A model whose config already has Llama 3.1 scaling is
    refused: its frequencies are part of its training, and scaling them again needs a new, explicit base.
    """
    if method not in METHODS:
        raise ValueError(f"unknown RoPE scaling method {method!r}; choose one of {', '.join(METHODS)}")
    if factor < 1:
        raise ValueError(f"factor={factor} would shrink the context; give a factor >= 1")
    if getattr(model, "rope_scaling_method", None) is not None:
        raise ValueError("the model already has a scaled RoPE; call unscale_rope(model) first")
    if model.config.rope_scaling is not None:
        raise ValueError("this checkpoint was trained with Llama 3.1 RoPE scaling (config.rope_scaling); scaling it "
                         "again is not supported: raise its context with its own factor instead")
    original = original_max_seq_len or model.config.max_seq_len
    new_len = max_seq_len or int(round(factor * original))
    spec = RopeScalingMethod(method, float(factor), original, **options)
    cfg = dataclasses.replace(model.config, max_seq_len=max(new_len, model.config.max_seq_len))
    if method == "llama3":  # core knows this one: the config says it, so save_hf writes it and loaders apply it
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling(float(factor), spec.low_freq_factor,
                                                                spec.high_freq_factor, original))
    model.config = cfg
    model.rope_scaling_method = spec
    model.rope = _rope_table(model, spec)
    if method == "dynamic":
        model._dynamic_rope_len = original
        model._dynamic_rope_hook = model.register_forward_pre_hook(_dynamic_rope_update, with_kwargs=True)
    return model


def unscale_rope(model: MinimalLlama, max_seq_len: int | None = None) -> MinimalLlama:
    """Undo ``scale_rope``: plain RoPE again, context back to ``max_seq_len`` (default: the original length)."""
    spec = getattr(model, "rope_scaling_method", None)
    if spec is None:
        return model
    hook = getattr(model, "_dynamic_rope_hook", None)
    if hook is not None:
        hook.remove()
        model._dynamic_rope_hook = None
    model.config = dataclasses.replace(model.config, rope_scaling=None,
                                       max_seq_len=max_seq_len or spec.original_max_seq_len)
    model.rope_scaling_method = None
    model.reset_rope()
    return model


def _dynamic_rope_update(model: MinimalLlama, args: tuple, kwargs: dict):
    """Before each forward: the current length is the largest position + 1. Past the original context the NTK
    factor follows it (and only grows while it stays past it, as in transformers, so a long decode does not flip
    back and forth); back at or below the original context the unscaled table returns (transformers resets only
    strictly below it)."""
    tokens = args[0] if args else kwargs["tokens"]
    input_pos = args[1] if len(args) > 1 else kwargs.get("input_pos")
    seq_len = int(input_pos.max()) + 1 if input_pos is not None else tokens.shape[1]
    spec, original = model.rope_scaling_method, model.rope_scaling_method.original_max_seq_len
    if seq_len > model._dynamic_rope_len:
        model._dynamic_rope_len = seq_len
        model.rope = _rope_table(model, spec, seq_len)
    elif seq_len <= original < model._dynamic_rope_len:
        model._dynamic_rope_len = original
        model.rope = _rope_table(model, spec, original)


# --------------------------------------------------------------------------------------------- saving
def hf_rope_parameters(model: MinimalLlama) -> tuple[dict | None, int]:
    """The transformers ``rope_scaling`` dict and ``max_position_embeddings`` that describe the model's RoPE.

    NTK-aware (static) has no type in transformers: it is plain RoPE with a larger base, so it is written as such
    (``rope_theta`` changes; see ``save_hf_scaled``)."""
    spec, cfg = getattr(model, "rope_scaling_method", None), model.config
    if spec is None:
        return None, cfg.max_seq_len
    if spec.method == "linear":
        return {"rope_type": "linear", "factor": spec.factor}, cfg.max_seq_len
    if spec.method == "ntk":
        return None, cfg.max_seq_len
    if spec.method == "dynamic":  # transformers reads the original length from max_position_embeddings
        return {"rope_type": "dynamic", "factor": spec.factor}, spec.original_max_seq_len
    if spec.method == "yarn":
        return {"rope_type": "yarn", "factor": spec.factor, "beta_fast": spec.beta_fast, "beta_slow": spec.beta_slow,
                "original_max_position_embeddings": spec.original_max_seq_len}, cfg.max_seq_len
    return {"rope_type": "llama3", "factor": spec.factor, "low_freq_factor": spec.low_freq_factor,
            "high_freq_factor": spec.high_freq_factor,
            "original_max_position_embeddings": spec.original_max_seq_len}, cfg.max_seq_len


def save_hf_scaled(model: MinimalLlama, directory: str | os.PathLike, tokenizer=None) -> None:
    """``minllama.core.save_hf``, then the RoPE scaling written into ``config.json`` (atomically) so that
    transformers runs the saved model with the same frequencies."""
    from minllama.core.checkpoint import save_hf

    save_hf(model, directory, tokenizer)
    spec = getattr(model, "rope_scaling_method", None)
    if spec is None:
        return
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["rope_scaling"], config["max_position_embeddings"] = hf_rope_parameters(model)
    if spec.method == "ntk":
        config["rope_theta"] = ntk_theta(model.config.rope_theta, model.config.head_dim, spec.factor)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)
