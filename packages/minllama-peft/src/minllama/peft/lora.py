"""LoRA and DoRA adapters, applied to a MinimalLlama from outside by wrapping its Linear layers.

A frozen weight W (out, in) is adapted by a low-rank update: W' = W + s * B @ A, with A (r, in), B (out, r) and
r << min(in, out). Only A and B train. ``s`` is alpha / r (or alpha / sqrt(r) with rsLoRA). DoRA also learns the
length of every output row: W' = m * (W + s B A) / ||W + s B A||, with m (out,).

    apply_lora(model, LoraConfig(r=8, alpha=16, targets=("wq", "wv")))   # freezes the model, adds "default"
    ...train...
    merge(model); unmerge(model)            # fold the update into W (no extra cost at inference) and back
    add_adapter(model, cfg, "other"); set_adapter(model, "other")        # several adapters, one active
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import base_bias, dense_weight, is_linear_like, linear_shape

# Our (Meta) module names, and the HF names accepted as aliases.
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")
ALL_LINEAR = ATTENTION + MLP
HF_ALIASES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
              "down_proj": "w2", "up_proj": "w3", "lm_head": "output"}
KNOWN_TARGETS = (*ALL_LINEAR, "output")


class AdapterError(ValueError):
    """An adapter cannot be applied, loaded or saved; the message says what is wrong and what to do."""


def _whole(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class LoraConfig:
    """r: rank; alpha: scale numerator; dropout: on the adapter's input; targets: which Linear layers (ours
    or HF names); layers: which blocks (None = all); use_rslora: s = alpha/sqrt(r) instead of alpha/r, which keeps
    the update's size independent of r; use_dora: learn each output row's magnitude too."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wv")
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self):
        # Each value is checked for its type too: r=8.9 or layers="01" must be refused, not truncated to 8 or read
        # character by character (bool is an int in Python: r=True is refused as well).
        if not _whole(self.r) or self.r < 1:
            raise AdapterError(f"LoRA rank r={self.r!r} must be a positive integer")
        object.__setattr__(self, "r", int(self.r))
        if not _real(self.alpha) or not 0 < self.alpha < math.inf:
            raise AdapterError(f"alpha={self.alpha!r} must be a finite number > 0 (the update is scaled by alpha/r)")
        if not _real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        for key in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, key), bool):
                raise AdapterError(f"{key}={getattr(self, key)!r} must be True or False")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"targets={self.targets!r} must be a module name or a list of names")
        targets = tuple(HF_ALIASES.get(t, t) for t in targets)
        unknown = [t for t in targets if t not in KNOWN_TARGETS]
        if unknown or not targets:
            raise AdapterError(f"unknown LoRA target(s) {unknown or targets}: choose among {', '.join(KNOWN_TARGETS)} "
                               f"(or the HF names {', '.join(HF_ALIASES)})")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.layers is not None:
            layers = (self.layers,) if _whole(self.layers) else self.layers
            ok = not isinstance(layers, (str, bytes, dict)) and hasattr(layers, "__iter__")
            layers = tuple(layers) if ok else ()
            if not ok or not all(_whole(i) and i >= 0 for i in layers):
                raise AdapterError(f"layers={self.layers!r} must be a layer index or a list of indices (>= 0)")
            object.__setattr__(self, "layers", tuple(dict.fromkeys(int(i) for i in layers)))  # repeats once

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


class LoraLinear(nn.Module):
    """A Linear-like base module plus named low-rank adapters; at most one is active (or merged) at a time.

    Parameter names: ``base.*`` (frozen), ``lora_A.<name>`` (r, in), ``lora_B.<name>`` (out, r) and, for DoRA,
    ``lora_magnitude.<name>`` (out,).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not is_linear_like(base):
            raise AdapterError(f"cannot adapt {type(base).__name__}: not Linear-like (see minllama.peft.base)")
        self.base = base
        self.out_features, self.in_features = linear_shape(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.configs: dict[str, LoraConfig] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into base's weight, if any
        self._merged_norm: Tensor | None = None  # DoRA: the row norms used by merge, needed to unmerge exactly

    # ------------------------------------------------------------------------------------------------ adapters
    def add(self, name: str, cfg: LoraConfig) -> None:
        if name in self.configs:
            raise AdapterError(f"adapter {name!r} already exists; choose another name or delete_adapter it first")
        w = dense_weight(self.base)
        dev = w.device
        dtype = w.dtype if w.is_floating_point() else torch.float32
        A = torch.empty(cfg.r, self.in_features, device=dev, dtype=dtype)
        # The standard init: A like nn.Linear's default (uniform, bound 1/sqrt(in)), B = 0, so that the adapted
        # model starts exactly as the base model and the first gradient reaches B (dL/dB = (dL/dy) (A x)^T != 0).
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=dev, dtype=dtype))
        if cfg.use_dora:  # m starts as the row norms of W: again the adapted model starts as the base one
            with torch.no_grad():
                self.lora_magnitude[name] = nn.Parameter(torch.linalg.norm(w.detach().to(dtype), dim=1))
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.configs[name] = cfg

    def delete(self, name: str) -> None:
        if self.merged == name:
            raise AdapterError(f"adapter {name!r} is merged: unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in d:
                del d[name]
        self.configs.pop(name)
        if self.active == name:
            self.active = None

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A: the LoRA update of the weight, (out, in)."""
        return self.configs[name].scaling * (self.lora_B[name] @ self.lora_A[name])

    def adapted_weight(self, name: str) -> Tensor:
        """The dense weight the adapted layer computes with: W + s B A, or DoRA's m * (W + s B A) / ||W + s B A||."""
        w = dense_weight(self.base)
        v = w + self.delta_weight(name).to(w.dtype)  # (out, in)
        if not self.configs[name].use_dora:
            return v
        norm = torch.linalg.norm(v, dim=1).detach()  # (out,)
        return (self.lora_magnitude[name] / norm)[:, None].to(w.dtype) * v

    # ------------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        name = self.active
        if name is None or self.merged is not None:
            return y
        cfg = self.configs[name]
        A, B, s = self.lora_A[name], self.lora_B[name], cfg.scaling
        xd = self.lora_dropout[name](x).to(A.dtype)
        low_rank = F.linear(F.linear(xd, A), B)  # (..., r) -> (..., out): never forms the (out, in) product
        if not cfg.use_dora:
            return y + (s * low_rank).to(y.dtype)
        # DoRA: y' = m/||W + sBA|| * (W x + s B A x). The norm is treated as a constant (no gradient through it),
        # as the DoRA paper recommends: it saves memory and changes little.
        w = dense_weight(self.base).to(A.dtype)
        with torch.no_grad():
            norm = torch.linalg.norm(w + s * (B @ A), dim=1)  # (out,)
        scale = self.lora_magnitude[name] / norm  # (out,)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = base_bias(self.base)
            base_out = y.to(A.dtype) if bias is None else (y - bias).to(A.dtype)
        else:  # with dropout the adapter sees a different x: recompute W x on it
            base_out = F.linear(xd, w)
        return y + ((scale - 1) * base_out + scale * s * low_rank).to(y.dtype)

    # --------------------------------------------------------------------------------------------------- merge
    def _writable_weight(self) -> Tensor:
        w = getattr(self.base, "weight", None)
        if callable(getattr(self.base, "dequantize", None)) or not isinstance(w, Tensor) or not w.is_floating_point():
            raise AdapterError(f"cannot merge into a {type(self.base).__name__} base in place (quantized weights "
                               "cannot hold the update): use merge_and_unload(model) to get dense Linear layers")
        return w

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged is not None:
            raise AdapterError(f"adapter {self.merged!r} is already merged: unmerge it first")
        name = self.active
        if name is None:
            return
        w = self._writable_weight()
        v = w.float() + self.delta_weight(name).float()
        if self.configs[name].use_dora:
            self._merged_norm = torch.linalg.norm(v, dim=1)
            v = (self.lora_magnitude[name].float() / self._merged_norm)[:, None] * v
        w.copy_(v)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        name = self.merged
        if name is None:
            return
        w = self._writable_weight()
        v = w.float()
        if self.configs[name].use_dora:
            v = v * (self._merged_norm / self.lora_magnitude[name].float())[:, None]
            self._merged_norm = None
        w.copy_(v - self.delta_weight(name).float())
        self.merged = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.configs)}, active={self.active}"


# ------------------------------------------------------------------------------------------------- the model
def target_paths(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Module paths (ours) that ``cfg`` adapts, e.g. layers.0.attention.wq."""
    n_layers = len(model.layers)
    layers = range(n_layers) if cfg.layers is None else cfg.layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise AdapterError(f"layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    paths = []
    for i in layers:
        for t in cfg.targets:
            if t in ATTENTION:
                paths.append(f"layers.{i}.attention.{t}")
            elif t in MLP:
                paths.append(f"layers.{i}.feed_forward.{t}")
    if "output" in cfg.targets:
        paths.append("output")
    return paths


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield path, m


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_adapter(model: nn.Module, cfg: LoraConfig, name: str = "default", activate: bool = True) -> nn.Module:
    """Wrap the targets of ``cfg`` (once) and add adapter ``name`` to them; freeze everything but adapters."""
    for path in target_paths(model, cfg):
        m = model.get_submodule(path)
        if not isinstance(m, LoraLinear):
            m = LoraLinear(m)
            _set_module(model, path, m)
        m.add(name, cfg)
    mark_only_adapters_trainable(model)
    if activate:
        set_adapter(model, name)
    return model


apply_lora = add_adapter  # the usual first call: apply_lora(model, LoraConfig(...))


def adapter_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, m in lora_modules(model) for n in m.configs))


def adapter_config(model: nn.Module, name: str = "default") -> LoraConfig:
    for _, m in lora_modules(model):
        if name in m.configs:
            return m.configs[name]
    raise AdapterError(f"the model has no adapter {name!r}; it has {adapter_names(model) or 'none'}")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter of every wrapped layer (None: run the base model)."""
    if name is not None:
        adapter_config(model, name)  # raises if unknown
    for _, m in lora_modules(model):
        if m.merged is not None:
            raise AdapterError(f"adapter {m.merged!r} is merged: unmerge(model) before switching adapters")
        m.active = name if name in m.configs else None


@contextmanager
def disabled_adapters(model: nn.Module):
    """Run the base model inside the block (e.g. for a reference forward), then restore the active adapter."""
    active = {p: m.active for p, m in lora_modules(model)}
    set_adapter(model, None)
    try:
        yield model
    finally:
        for p, m in lora_modules(model):
            m.active = active[p]


def delete_adapter(model: nn.Module, name: str) -> None:
    adapter_config(model, name)
    for _, m in lora_modules(model):
        if name in m.configs:
            m.delete(name)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in f".{n}")


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters (of adapter ``name``, or of all adapters): what the optimizer gets."""
    return [p for n, p in model.named_parameters() if ".lora_" in f".{n}" and (name is None or n.endswith(f".{name}"))]


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """{``<module path>.lora_A`` | ``.lora_B`` | ``.lora_magnitude``: tensor} of one adapter, in our names."""
    adapter_config(model, name)
    out = {}
    for path, m in lora_modules(model):
        if name in m.configs:
            out[f"{path}.lora_A"] = m.lora_A[name].detach()
            out[f"{path}.lora_B"] = m.lora_B[name].detach()
            if name in m.lora_magnitude:
                out[f"{path}.lora_magnitude"] = m.lora_magnitude[name].detach()
    return out


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge(model: nn.Module) -> None:
    """Fold the active adapter into the base weights: W <- W' (same outputs, no adapter cost at inference)."""
    for path, m in lora_modules(model):
        tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
        if path == "output" and tied and m.active is not None:
            raise AdapterError("the head is tied to the token embedding: merging into it would change the embedding "
                               "too; use merge_and_unload(model), which gives the head its own weight")
    for _, m in lora_modules(model):
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: the base weights come back (to float rounding) and the adapter runs separately again."""
    for _, m in lora_modules(model):
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every wrapped layer by a plain ``nn.Linear`` holding the adapted weight (dense, even if the base was
    quantized): the result is a MinimalLlama again, that ``save_hf`` can write. Layers without an active adapter
    get their (dequantized) base weight."""
    for path, m in list(lora_modules(model)):
        name = m.active or m.merged
        w = dense_weight(m.base) if (name is None or m.merged) else m.adapted_weight(name)
        bias = base_bias(m.base)
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
        _set_module(model, path, lin)
        if path == "output" and name is not None and getattr(model.config, "tie_embeddings", False):
            # the head now differs from the embedding: say so, or save_hf would store only the embedding
            model.config = dataclasses.replace(model.config, tie_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
