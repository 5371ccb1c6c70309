"""Model shapes: one dataclass and the presets of the Llama family.

A Llama is fully described by a dozen numbers. Everything else (head size, how many query heads share one
key/value head) is derived from them in ``__post_init__`` so that the numbers can never disagree.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_CONTEXT = 1 << 24  # 16.7M positions: beyond every published Llama-family context

@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 frequency scaling: slow (long-wavelength) rotary frequencies are divided by ``factor``,
    fast ones are kept, and the band in between is interpolated smoothly. The checkpoints were trained with it,
    so it is part of the architecture, not an option (see ``model.rope_frequencies``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096  # width of the residual stream
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads: = n_heads (MHA), 1 (MQA), in between (GQA)
    hidden_dim: int = 11008  # width of the SwiGLU feed-forward
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    head_dim: int | None = None  # derived: dim // n_heads unless a checkpoint says otherwise
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self._check_values()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; give head_dim explicitly")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of channels")

    def _check_values(self) -> None:
        """Every number in range, before anything is sized from it (a context of 1e9 would allocate 256 GB)."""
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len", "n_kv_heads", "head_dim"):
            value = getattr(self, key)
            if value is None and key in ("n_kv_heads", "head_dim"):
                continue  # derived below
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a whole number >= 1")
        if self.max_seq_len > MAX_CONTEXT:
            raise ValueError(f"max_seq_len={self.max_seq_len} is beyond {MAX_CONTEXT} positions: the rotary table "
                             "alone would not fit in memory; is the config damaged?")
        for key in ("norm_eps", "rope_theta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{key}={value!r} must be a finite number > 0")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} must be true or false")
        s = self.rope_scaling
        if s is not None:
            numbers = (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_seq_len)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf for x in numbers) \
                    or s.factor < 1 or s.high_freq_factor <= s.low_freq_factor:
                raise ValueError(f"rope_scaling={s} needs factor >= 1, 0 < low_freq_factor < high_freq_factor and a "
                                 "positive original_max_seq_len")

    @property
    def n_rep(self) -> int:
        """How many query heads share each key/value head (1 for MHA, n_heads for MQA)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        key = name.lower()
        if key not in _PRESET_ARGS:
            raise KeyError(f"unknown model config {name!r}; known: {', '.join(sorted(_PRESET_ARGS))}")
        return cls(**{**_PRESET_ARGS[key], **overrides}, name=key)  # derived fields follow the overrides

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_L31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_L32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_L3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)

_PRESET_ARGS: dict[str, dict] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=8192, **_L3),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                        max_seq_len=131072, rope_scaling=_L31, **_L3),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                         max_seq_len=131072, rope_scaling=_L31, **_L3),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                        max_seq_len=131072, rope_scaling=_L32, tie_embeddings=True, **_L3),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                        max_seq_len=131072, rope_scaling=_L32, tie_embeddings=True, **_L3),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-360m": dict(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-1.7b": dict(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192,
                         rope_theta=130000.0, max_seq_len=8192, tie_embeddings=True),
    # Tiny configs for tests and from-scratch experiments: seconds on a CPU.
    "tiny-mha": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=128, max_seq_len=128),
    "tiny-gqa": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128),
    "tiny-mqa": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=128, max_seq_len=128,
                     tie_embeddings=True),
    "tiny-llama3": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                        rope_theta=500000.0, max_seq_len=256,
                        rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=32)),
}
PRESETS: dict[str, LlamaConfig] = {name: LlamaConfig(**args, name=name) for name, args in _PRESET_ARGS.items()}
