"""Batch-1 decoding on a CPU with the decoder layers in C++ (one call per token), and the swap that applies it.

Why: a decode step of a small model is not limited by arithmetic but by two other things. Its matrix-vector
products must stream every weight from memory once (``cpu_gemv``: the bandwidth bound), and in between come
hundreds of tiny operations (norms, RoPE, a softmax over one query, residual adds) that each cost PyTorch a few
microseconds of dispatch for a few nanoseconds of work. On SmolLM2-135M those two halves take about as long as
each other (``apps/profile_decode.py``). ``csrc/cpu_kernels.cpp`` does a whole layer for one token (and all the
layers in one call): the same steps as core's ``TransformerBlock``, in the same order, with the GEMVs spread over
the threads. What is left in Python per token is the embedding, the head and a check that the layers' weights
are still the ones gathered at the first step (``GatheredWeights``).

``use_cpu_decode(model)`` changes the class of a core ``MinimalLlama`` (in place, weights untouched) so that its
``forward`` takes the fast path exactly when it can: one token of one sequence, a ``StaticKVCache``, no padding,
no gradient, not being traced by ``torch.compile``, on the CPU. A prompt of one sequence (``last_only``) runs
core's layers and only its last position's head in C++; a short one of a quantized model runs its layers in C++
too, a token at a time (``STEPWISE_PROMPT``). Everything else (batches, training, other caches) is the
model's own ``forward``. The model's layers must be core's, in fp32 or bf16, with plain linear
layers or minllama-quant's int8, int4 or GGUF-block ones (``matrix``); otherwise (LoRA, NF4, fp8 or
tensor-parallel linears, another attention), or where the extension cannot be had, nothing changes and
``cpu_decode_unsupported(model)`` says why. ``remove_cpu_decode(model)`` undoes it.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch import Tensor

from minllama.core.cache import StaticKVCache
from minllama.core.model import Attention, FeedForward, MinimalLlama, RMSNorm, TransformerBlock

from . import cpu_gemv

# A prompt of at most this many tokens, when the layers are quantized, goes through the C++ layers a token at a time
# (as many decode steps) rather than through core's forward, which would dequantize every matrix whole to multiply
# a few rows (minllama-quant's fallback path). SmolLM2's 14-token prompt on a 2-core AVX-512 VM: 370-425 tok/s in
# int8, int4 and Q4_1 (apps/bench.py --prompt-len 14), 53-255 before, and no dequantized temporaries. A float
# model's prompt stays a matrix product, faster than token by token at any length.
STEPWISE_PROMPT = 16

GGUF_KINDS = ("q4_0", "q4_1", "q8_0")


def matrix(linear: nn.Module) -> tuple[str, tuple[Tensor, ...]] | None:
    """A linear layer's weight as the C++ GEMV reads it, (kind, tensors), or None if it cannot:

        ("float", (weight,))                   a plain nn.Linear without bias, fp32 or bf16
        ("int8", (qweight, scales))            int8 per output channel: weight = qweight * scales[:, None]
        ("int4", (qweight, scales, mins))      int4, a (scale, min) per group of 32k inputs, two codes a byte
        ("q4_0" | "q4_1" | "q8_0", (blocks,))  a GGUF tensor's bytes, llama.cpp's layouts

    The quantized ones are minllama-quant's ``Int8Linear``, ``Int4Linear`` and ``GGUFLinear``, read by their
    documented ``scheme`` and buffers (the two packages do not import each other). Anything else (NF4, fp8,
    adapters, biases) is None."""
    if type(linear) in (nn.Linear, cpu_gemv.GemvLinear) and linear.bias is None:
        return "float", (linear.weight,)
    scheme, buffers = getattr(linear, "scheme", None), getattr(linear, "_buffers", {})
    if scheme == "int8" and _typed(buffers, qweight=torch.int8, scales=torch.float32):
        return "int8", (buffers["qweight"], buffers["scales"])
    if scheme == "int4" and _typed(buffers, qweight=torch.uint8, scales=torch.float16, mins=torch.float16):
        return "int4", (buffers["qweight"], buffers["scales"], buffers["mins"])
    if scheme in GGUF_KINDS and _typed(buffers, blocks=torch.uint8):
        return scheme, (buffers["blocks"],)
    return None


def _typed(buffers: dict, **dtypes) -> bool:
    return all(getattr(buffers.get(name), "dtype", None) == dtype for name, dtype in dtypes.items())


def cpu_decode_unsupported(model: nn.Module) -> str | None:
    """None when ``use_cpu_decode`` can take over this model's one-token steps, else the reason why not."""
    if not isinstance(model, MinimalLlama):
        return f"not a MinimalLlama: {type(model).__name__}"
    if (reason := cpu_gemv.cpu_gemv_supported()) is not None:
        return reason
    own = _own_class(model)
    for name in ("forward", "hidden_states"):  # a subclass that computes a step differently must keep its own
        if getattr(own, name) is not getattr(MinimalLlama, name):
            return f"{own.__name__} overrides {name}: the C++ step would skip what it does"
    weight = model.norm.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the C++ layer runs fp32 or bf16 models on the CPU; this model is {weight.dtype} on {weight.device}"
    if matrix(model.output) is None:
        return f"the head is a {type(model.output).__name__}, which the C++ GEMV does not read (see matrix())"
    for i, layer in enumerate(model.layers):
        parts = {"block": (layer, TransformerBlock), "attention": (layer.attention, Attention),
                 "feed_forward": (layer.feed_forward, FeedForward), "attention_norm": (layer.attention_norm, RMSNorm),
                 "ffn_norm": (layer.ffn_norm, RMSNorm)}
        for name, (module, core_class) in parts.items():
            if type(module) is not core_class:
                return f"layer {i}'s {name} is a {type(module).__name__}, not core's {core_class.__name__}"
        for name, module in (*layer.attention.named_children(), *layer.feed_forward.named_children()):
            if (readable := matrix(module)) is None:
                return (f"layer {i}'s {name} is a {type(module).__name__}: the C++ layer reads plain nn.Linear "
                        "(no bias), int8, int4 and GGUF Q4_0/Q4_1/Q8_0 weights")
            w = readable[1][0]
            if w.device.type != "cpu":
                return f"layer {i}'s {name} is on {w.device}"
        if any(norm.weight.dtype != weight.dtype for norm in (layer.attention_norm, layer.ffn_norm)):
            return f"layer {i}'s norms are not in the model's dtype {weight.dtype}"
    return None


def layer_weights(model: MinimalLlama) -> list[tuple]:
    """Each layer's weights as the extension's ``DecoderWeights`` takes them: (attention_norm, ffn_norm,
    [matrix() of wq, wk, wv, wo, w1, w2, w3])."""
    out = []
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        out.append((layer.attention_norm.weight, layer.ffn_norm.weight,
                    [matrix(m) for m in (attn.wq, attn.wk, attn.wv, attn.wo, ff.w1, ff.w2, ff.w3)]))
    return out


class GatheredWeights:
    """``layer_weights(model)``, kept between steps with everything it was read from, and as the extension's
    ``DecoderWeights`` (``native``: checked once in C++, read by pointer at every step).

    Gathering ~300 tensors through ``nn.Module`` attribute lookups costs ~0.6 ms per token: 3% of an fp32 step
    and 12% of a 4-bit one. Kept instead, it must never go stale: a module swapped in (an adapter), a buffer
    replaced (``model.to()`` replaces buffers without any hook), a class changed. So it records every entry of every
    ``_modules``, ``_parameters`` and ``_buffers`` dict on the way from the layer list to each weight, and each
    module's class; ``current()`` checks them all by identity in one pass (~0.05 ms) and any change means a fresh
    gather. (Values changed in place, e.g. ``load_state_dict``, are seen anyway: the same tensors are read.)"""

    def __init__(self, model: MinimalLlama):
        self.entries: list[tuple[dict, str, object]] = []  # (a module's dict, key, what it held)
        self.classes: list[tuple[nn.Module, type]] = []
        self._record(model, "layers")
        self.layer_list, self.n_layers = model.layers, len(model.layers)  # a layer appended must be seen too
        for name in list(model.layers._modules):
            self._record(model.layers, name)
        for layer in model.layers:
            for name in ("attention", "feed_forward", "attention_norm", "ffn_norm"):
                self._record(layer, name)
            for block in (layer.attention, layer.feed_forward):
                for name in list(block._modules):
                    self._record(block, name)
        layers = layer_weights(model)
        self.native = self.quantized = None
        if all(m is not None for layer in layers for m in layer[2]):  # else e.g. an adapter swapped in since
            n_kv_heads, head_dim = model.layers[0].attention.cache_shape()  # use_cpu_decode: core's forward runs it
            self.native = cpu_gemv._extension().DecoderWeights(layers, model.config.dim, model.config.n_heads,
                                                               n_kv_heads, head_dim)
            self.quantized = any(kind != "float" for layer in layers for kind, _ in layer[2])

    def _record(self, parent: nn.Module, name: str) -> None:
        child = parent._modules[name]
        self.entries.append((parent._modules, name, child))
        self.classes.append((child, type(child)))
        for tensors in (child._parameters, child._buffers):
            self.entries += [(tensors, key, value) for key, value in tensors.items()]

    def current(self) -> bool:
        return (len(self.layer_list) == self.n_layers and all(d.get(k) is v for d, k, v in self.entries)
                and all(type(m) is c for m, c in self.classes))


_gathered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> GatheredWeights (never copied with it)


def current_layer_weights(model: MinimalLlama) -> GatheredWeights | None:
    """The model's ``GatheredWeights``, gathered again only when something changed; None if a layer cannot run in
    C++."""
    kept = _gathered.get(model)
    if kept is None or not kept.current():
        kept = _gathered[model] = GatheredWeights(model)
    return kept if kept.native is not None else None


def cpu_decode_usable(model: nn.Module) -> bool:
    return cpu_decode_unsupported(model) is None and cpu_gemv.cpu_gemv_usable()


class CpuDecodeMixin:
    """Put before the model's own class (``use_cpu_decode`` does it): a one-token step runs the C++ layers."""

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                last_only: bool = False, cache=None) -> Tensor:
        if tokens.device.type != "cpu":  # moved off the CPU: the weights gathered there must not stay alive
            _gathered.pop(self, None)
        if self._prompt_of_one_sequence(tokens, last_only) and (head := matrix(self.output)):
            # a prompt: core's layers (a matrix-matrix product, oneDNN's job), then the head for the last position
            # in C++, which reads a quantized head as it is stored instead of PyTorch's layouts of it. A short one
            # of a quantized model goes through the C++ layers a token at a time instead (see STEPWISE_PROMPT).
            layers = (tokens.shape[1] <= STEPWISE_PROMPT and self._cached_steps(tokens, input_pos, pad, cache)
                      and current_layer_weights(self))
            if layers and layers.quantized:
                h = self.norm(self._layers_in_cpp(tokens[0], input_pos, cache, layers.native))
            else:
                h = self.hidden_states(tokens, input_pos, pad, cache=cache)[0, -1].float().contiguous()  # (dim,)
            return cpu_gemv._extension().gemv(h, *head).to(self.norm.weight.dtype).view(1, 1, -1)
        layers = (tokens.shape == (1, 1) and self._cached_steps(tokens, input_pos, pad, cache)
                  and current_layer_weights(self))
        head = layers and matrix(self.output)
        if not head:  # not a one-token step, or a module the C++ step cannot read was swapped in since
            return super().forward(tokens, input_pos, pad, last_only, cache)
        h = self.norm(self._layers_in_cpp(tokens[0], input_pos, cache, layers.native))  # fp32, as x
        logits = cpu_gemv._extension().gemv(h, *head)  # (vocab,) fp32
        return logits.to(self.norm.weight.dtype).view(1, 1, -1)  # (B=1, T=1, vocab), the model's dtype

    def _layers_in_cpp(self, tokens: Tensor, input_pos: Tensor, cache: StaticKVCache, layers) -> Tensor:
        """Feed ``tokens`` (T,) one at a time through every layer in C++, at ``input_pos``: each writes its slot of
        every layer's cache and attends over the slots up to its own. Returns the last one's residual stream."""
        ext, eps = cpu_gemv._extension(), self.config.norm_eps
        embedded = self.tok_embeddings(tokens).float()  # (T, dim) fp32: the residual streams
        for i, pos in enumerate(input_pos.tolist()):
            x = embedded[i].clone()  # (dim,)
            rope = self.rope[pos].float()  # (head_dim/2, 2): cos, sin of this position (bf16 in a bf16 model)
            # one call for all layers: each updates x and writes slot `pos` of its layer's cache, in place
            ext.decoder_layers(x, layers, cache.k, cache.v, rope, pos, eps)
        return x

    def _prompt_of_one_sequence(self, tokens: Tensor, last_only: bool) -> bool:
        return (last_only and tokens.shape[0] == 1 and tokens.shape[1] > 1 and tokens.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def _cached_steps(self, tokens: Tensor, input_pos, pad, cache) -> bool:
        """Whether tokens of one sequence can go through the C++ layers: into an fp32 or bf16 StaticKVCache (the
        C++ step computes in fp32 and rounds what it stores, as core's cache does, whatever the model's dtype), at
        known positions (one each: anything else is core's forward's error to report), unpadded, for inference
        (not traced)."""
        return (pad is None and input_pos is not None and input_pos.shape == tokens.shape[-1:]
                and type(cache) is StaticKVCache
                and cache.k[0].dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and tokens.device.type == "cpu")


_classes: dict[type, type] = {}  # model class -> its CpuDecodeMixin subclass (one per class, so isinstance holds)


def use_cpu_decode(model: MinimalLlama) -> MinimalLlama:
    """Make ``model``'s one-token CPU steps run the C++ decoder layers, in place; returns the model.

    Unchanged (and ``cpu_decode_unsupported`` says why) when it cannot apply. The first call ever builds the
    extension (~20-40 s, then cached); ``cpu_gemv`` warns once if the build fails, and the model stays as it was."""
    if isinstance(model, CpuDecodeMixin) or not cpu_decode_usable(model):
        return model
    cls = type(model)
    if cls not in _classes:
        _classes[cls] = type(f"CpuDecode{cls.__name__}", (CpuDecodeMixin, cls), {"__module__": cls.__module__})
    model.__class__ = _classes[cls]
    return model


def _own_class(model: nn.Module) -> type:
    """The model's class before ``use_cpu_decode``: (CpuDecodeX, CpuDecodeMixin, X, ...) -> X."""
    return type(model).__mro__[2] if isinstance(model, CpuDecodeMixin) else type(model)


def remove_cpu_decode(model: MinimalLlama) -> MinimalLlama:
    model.__class__ = _own_class(model)
    return model
