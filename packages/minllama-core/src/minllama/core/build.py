"""From a config to a model with weights, one way for every package.

A model of billions of parameters must not be built with random weights only to overwrite them: that costs the
memory twice and minutes of random numbers. So a loader builds it on PyTorch's ``meta`` device (shapes, no storage),
then either *assigns* the checkpoint's tensors (``load_state_dict(..., assign=True)``) or *materializes* storage
on a device (after sharding, each rank allocates only its shards). The RoPE table is a non-persistent buffer, in no
checkpoint: either way it must be recomputed on the device, which ``MinimalLlama.reset_rope`` does.

    model = meta_model(cfg)                          # instant, whatever the size
    model.load_state_dict(tensors, assign=True)      # a loader, or: materialize(model, device) to train from scratch
    model.reset_rope()

Core's loaders, minllama-quant, minllama-dist and minllama-extend all go through these functions; ``gguf_tensors``
is the one walk over a GGUF file's tensors, for the float loader here and the block-keeping loader of quant.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from .config import LlamaConfig
from .formats import GGUF_IGNORED, gguf_to_ours
from .model import MinimalLlama


def meta_model(cfg: LlamaConfig, model_class: type[MinimalLlama] = MinimalLlama) -> MinimalLlama:
    """Build the model on the ``meta`` device: shapes only, no memory, no random numbers (instant for 70B)."""
    with _on_meta():
        return model_class(cfg)


@contextmanager
def _on_meta():
    """Every parameter and buffer goes to the meta device as a module registers it, and nn.Linear / nn.Embedding
    skip their random init. Why not simply ``with torch.device("meta")``? It runs every op of the constructor on
    meta, and PyTorch implements the meta version of ``normal_`` or ``pow`` in Python: the first one imports
    torch._dynamo, ~1 s of a 135M model's start-up. Here nn.Linear and nn.Embedding are built with ``device="meta"``
    (allocating each weight on the CPU and freeing it at once stretched the C allocator's heap over hundreds of MB
    of holes in some runs, and later tensors scattered over them: +35 MB of peak RSS), and any other parameter or
    buffer (the norms; the RoPE table, computed in a few ms) goes to meta as it is registered. Not thread-safe: it
    patches torch.nn for the duration."""
    module, inits = nn.Module, {c: c.reset_parameters for c in (nn.Linear, nn.Embedding)}
    constructors = {c: c.__init__ for c in inits}
    register_parameter, register_buffer = module.register_parameter, module.register_buffer

    def parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a meta one is already shared (a tied head): keep it
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_on_meta(self: nn.Module, name: str, tensor, persistent: bool = True) -> None:
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    def on_meta(construct):
        return lambda self, *args, **kwargs: construct(self, *args, **{**kwargs, "device": "meta"})

    module.register_parameter, module.register_buffer = parameter_on_meta, buffer_on_meta
    for cls in inits:
        cls.reset_parameters = lambda self: None
        cls.__init__ = on_meta(constructors[cls])
    try:
        yield
    finally:
        module.register_parameter, module.register_buffer = register_parameter, register_buffer
        for cls, init in inits.items():
            cls.reset_parameters, cls.__init__ = init, constructors[cls]


def materialize(model: MinimalLlama, device: torch.device | str, init: bool = True) -> MinimalLlama:
    """Allocate a meta (possibly sharded) model's storage on ``device``; ``init`` fills it with ``init_weights``,
    otherwise the weights are left uninitialized (about to be loaded) and only the RoPE table is computed."""
    model.to_empty(device=device)
    if init:
        with warnings.catch_warnings():  # FSDP: each rank draws its own shards from its own generator, fine for init
            warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
            model.init_weights()
    else:
        model.reset_rope()
    return model


def gguf_tensors(reader) -> tuple[dict[str, tuple[object, tuple[int, ...]]], list[str]]:
    """A GGUF file's llama tensors under our names -> ({name: (tensor info, shape in PyTorch order)}, unexpected).

    GGUF lists dimensions innermost first; the shape here is PyTorch's. Tensors a llama GGUF may carry but we do
    not use (``GGUF_IGNORED``) are skipped; anything else is returned as unexpected, for the caller to refuse."""
    found, unexpected = {}, []
    for t in reader.tensors:
        ours = gguf_to_ours(t.name)
        if ours is None:
            if t.name not in GGUF_IGNORED:
                unexpected.append(t.name)
            continue
        found[ours] = (t, tuple(int(n) for n in reversed(list(t.shape))))
    return found, unexpected
