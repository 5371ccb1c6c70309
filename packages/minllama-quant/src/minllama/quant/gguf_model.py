"""Run a GGUF file from its quantized blocks: ``load_gguf_quantized(path)`` -> (model, tokenizer).

core's ``load_pretrained`` dequantizes every tensor to fp32 (540 MB for SmolLM2-135M). Here the model is built on
the meta device and each Q8_0 / Q4_0 / Q4_1 tensor becomes a ``GGUFLinear`` holding a copy of the file's bytes
(the memory map is not kept open); F32/F16 tensors (the norms) are read as floats. Names and the config come from
core (``formats.gguf_to_ours``, ``config_from_gguf``), so both loaders agree on what every tensor is.
"""
from __future__ import annotations

import os

import torch

from minllama.core.checkpoint import checked_tokenizer, default_model_path
from minllama.core.build import gguf_tensors, meta_model
from minllama.core.formats import CheckpointError, config_from_gguf

from . import gguf_blocks
from .linear import GGUFLinear, QuantEmbedding

_FLOAT_TYPES = ("F32", "F16", "BF16")


def load_gguf_quantized(path: str | os.PathLike | None = None, device="cpu", with_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None); ``path`` defaults to the embedded SmolLM2-135M-Instruct."""
    from minllama.core.gguf_file import GGUFFile, to_torch

    path = path or default_model_path()
    try:
        reader = GGUFFile(path)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): re-download it") from None
    cfg = config_from_gguf(reader)
    model = meta_model(cfg)
    floats, blocks = {}, {}
    found, unexpected = gguf_tensors(reader)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]}: not a llama GGUF file")
    for ours, (t, shape) in found.items():
        if t.tensor_type.name in _FLOAT_TYPES:
            floats[ours] = to_torch(t)
        elif t.qtype():
            blocks[ours] = (t.qtype(), t.raw().clone())  # (N, bytes): a copy, so the file need not stay mapped
            t.release()  # and the file's pages need not stay resident beside it
        else:
            raise CheckpointError(f"{path}: tensor {t.name} is {t.tensor_type.name}; load_gguf_quantized keeps only "
                                  f"Q8_0/Q4_0/Q4_1 blocks: use minllama.core.load_pretrained (dequantizes to fp32)")
    if cfg.tie_embeddings:
        blocks.setdefault("output.weight", blocks.pop("tok_embeddings.weight", None))
        floats.setdefault("output.weight", floats.pop("tok_embeddings.weight", None))
        blocks = {k: v for k, v in blocks.items() if v is not None}
        floats = {k: v for k, v in floats.items() if v is not None}
    for name, (qtype, raw) in blocks.items():
        parent_name, child = name.removesuffix(".weight").rsplit(".", 1) if "." in name.removesuffix(".weight") \
            else ("", name.removesuffix(".weight"))
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if not isinstance(linear, torch.nn.Linear):
            raise CheckpointError(f"{path}: {name} is quantized but is not a linear layer's weight")
        if raw.shape[1] != linear.in_features // gguf_blocks.BLOCK * gguf_blocks.BLOCK_BYTES[qtype] or \
                raw.shape[0] != linear.out_features:
            raise CheckpointError(f"{path}: {name} has {tuple(raw.shape)} bytes of {qtype}, which does not fit "
                                  f"({linear.out_features}, {linear.in_features}): the config does not match")
        setattr(parent, child, GGUFLinear(linear.in_features, linear.out_features, {"blocks": raw.to(device)},
                                          qtype=qtype))
    if cfg.tie_embeddings and isinstance(model.output, GGUFLinear):
        model.tok_embeddings = QuantEmbedding(model.output)
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in floats.items()}, strict=False,
                                                assign=True)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta and n != "rope"]
    if still_meta or unexpected:
        raise CheckpointError(f"{path}: tensors missing for {still_meta[:4]} / unexpected {unexpected[:4]}")
    model.reset_rope(device)
    types = sorted({m.options["qtype"] for m in model.modules() if isinstance(m, GGUFLinear)})
    model.quant_config = {"scheme": "gguf", "qtypes": types}
    tokenizer = None
    if with_tokenizer:
        from minllama.core.tokenizer import tokenizer_from_gguf
        # load_pretrained's checks: a damaged vocabulary is a CheckpointError, and no id may pass the model's rows
        tokenizer = checked_tokenizer(lambda: tokenizer_from_gguf(reader), path, cfg)
    return model.eval(), tokenizer
