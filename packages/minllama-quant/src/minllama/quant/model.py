"""Quantize a whole MinimalLlama by swapping its modules, and save / load the result.

    quantize(model, "int8")                         every nn.Linear -> Int8Linear (in place, returns the model)
    quantize(model, "int4", group_size=64)          ... Int4Linear; "nf4" (double_quant=True), "fp8",
    quantize(model, "q8_0")                         ... or GGUF blocks: "q8_0", "q4_0", "q4_1"
    quantize(model, "int4", group_size=32, head="int8")     the output head (and tied embedding) at 8 bits
    save_quantized(model, "out/q")                  quant.json + model.safetensors (core's saving.save_into)
    load_quantized("out/q", scheme="int4", group_size=64)   checks what you expect against what was saved

A tied model (SmolLM2) shares one matrix between the embedding and the output head: the head is quantized and the
embedding becomes a ``QuantEmbedding`` that reads its rows, so the matrix is stored once, quantized. Norms stay
float (a few thousand numbers). The model code itself is not touched.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama, rope_cache, rope_frequencies
from minllama.core.saving import recover, recover_legacy, save_into

from .linear import LINEAR_CLASSES, FP8Linear, GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantEmbedding, \
    QuantLinear

FORMAT_VERSION = 1
# scheme -> (module class, default options)
SCHEMES: dict[str, tuple[type[QuantLinear], dict]] = {
    "int8": (Int8Linear, {}),
    "int4": (Int4Linear, {"group_size": 64}),
    "nf4": (NF4Linear, {"double_quant": False}),
    "fp8": (FP8Linear, {}),
    "q8_0": (GGUFLinear, {"qtype": "q8_0"}),
    "q4_0": (GGUFLinear, {"qtype": "q4_0"}),
    "q4_1": (GGUFLinear, {"qtype": "q4_1"}),
}


class QuantizationError(ValueError):
    """A quantized checkpoint or scheme is not what was asked for; the message says what to do."""


def scheme_options(scheme: str, **options) -> tuple[type[QuantLinear], dict]:
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    cls, defaults = SCHEMES[scheme]
    unknown = set(options) - set(defaults)
    if unknown:
        raise QuantizationError(f"scheme {scheme!r} has no option(s) {', '.join(sorted(unknown))}; "
                                f"its options are: {', '.join(defaults) or 'none'}")
    return cls, {**defaults, **options}


def _swap(model: MinimalLlama, make) -> None:
    """Replace every nn.Linear (by name) with make(name, linear); re-tie a shared embedding."""
    tied = model.output.weight is model.tok_embeddings.weight or model.config.tie_embeddings
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, make(full, child))
    if tied and isinstance(model.output, QuantLinear):
        model.tok_embeddings = QuantEmbedding(model.output)


def quantize(model: MinimalLlama, scheme: str, head: str | None = None, **options) -> MinimalLlama:
    """Quantize every linear layer of ``model`` in place (see the module docstring); returns the model.

    ``head`` quantizes the output head (and so a tied embedding) with another scheme, at its default options:
    llama.cpp's 4-bit files keep that matrix at 6-8 bits, because every logit, and every token's embedding, goes
    through it. ``quantize(model, "int4", group_size=32, head="int8")`` costs 11 MiB more on SmolLM2."""
    cls, opts = scheme_options(scheme, **options)
    head_cls, head_opts = scheme_options(head) if head is not None else (cls, opts)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantizationError("the model is already quantized: quantize a float model (load it again)")

    def make(name, lin):
        c, o = (head_cls, head_opts) if name == "output" else (cls, opts)
        return c.from_weight(lin.weight, **o).to(lin.weight.device)

    _swap(model, make)
    model.quant_config = {"scheme": scheme, **opts, **({"head": head} if head is not None else {})}
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def prepare(model: nn.Module) -> int:
    """Build every fast-kernel layout now (load time rather than first-token time); returns how many have one."""
    return sum(m.prepare() for m in quantized_modules(model).values())


def set_path(model: nn.Module, path: str) -> None:
    """"auto", "packed" or "fallback" for every quantized module (see ``linear.QuantLinear``)."""
    if path not in ("auto", "packed", "fallback"):
        raise ValueError(f"path must be 'auto', 'packed' or 'fallback', not {path!r}")
    for m in quantized_modules(model).values():
        m.path = path


def model_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights: the state dict (no KV cache, no kernel layouts), a tied matrix once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


# ---------------------------------------------------------------------------------------------- save / load
QUANT_FILE, WEIGHTS_FILE = "quant.json", "model.safetensors"
# The files of the checkpoint formats core loads: a folder holding some is refused unless overwrite=True (which then
# deletes them, so that load_pretrained cannot pick a stale config.json or params.json over the quantized model).
_FOREIGN = re.compile(r"config\.json|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors|params\.json"
                      r"|consolidated\.\d+\.pth")


def save_quantized(model: MinimalLlama, directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``quant.json`` (scheme, options, model config, every module's class/options) and ``model.safetensors``
    into ``directory`` with core's ``saving.save_into``: a kill at any moment leaves the previous checkpoint or the
    new one (loaders finish an interrupted save), files other than these two are kept, and so are the folder's
    permissions. A non-empty folder without quant.json, or one holding an HF or Meta checkpoint, is refused (a
    ``CheckpointError``) unless ``overwrite=True``."""
    config = getattr(model, "quant_config", None)
    if config is None:
        raise QuantizationError("the model is not quantized: call quantize(model, scheme) or load_gguf_quantized")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "quantization": config, "config": model.config.to_dict(),
            "modules": {name: m.spec() for name, m in quantized_modules(model).items()},
            "tied_embedding": isinstance(model.tok_embeddings, QuantEmbedding)}
    with save_into(directory, owns=lambda rel: rel in (QUANT_FILE, WEIGHTS_FILE), marker=QUANT_FILE,
                   foreign=_FOREIGN.fullmatch, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def load_quantized(directory: str | os.PathLike, scheme: str | None = None, device="cpu",
                   **expected_options) -> MinimalLlama:
    """Load a ``save_quantized`` directory. ``scheme`` and options (e.g. group_size=64), when given, must match
    what was saved: a model quantized otherwise is refused with a clear error rather than silently used."""
    path = Path(directory)
    if recover_legacy(path.absolute()):  # an earlier version's save was killed between its two renames
        warnings.warn(f"{path} was restored from the copy an interrupted save had left in .{path.name}.old-*")
    if path.is_dir():
        recover(path)  # a save killed after its commit is finished first: never a mix of two saves
    if not (path / "quant.json").is_file():
        raise QuantizationError(f"{path} has no quant.json: not a save_quantized checkpoint")
    meta = json.loads((path / "quant.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(f"{path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    saved = meta["quantization"]
    if scheme is not None and scheme != saved["scheme"]:
        raise QuantizationError(f"{path} holds a {saved['scheme']!r} model, not {scheme!r}: load it with "
                                f"scheme={saved['scheme']!r} or quantize the float model with {scheme!r}")
    known = {"head": None, **saved}  # a model quantized without head= has head=None
    for key, value in expected_options.items():
        if key not in known:
            raise QuantizationError(f"{path}: scheme {saved['scheme']!r} has no option {key!r}")
        if known[key] != value:
            raise QuantizationError(f"{path} was quantized with {key}={known[key]!r}, not {key}={value!r}: load it "
                                    f"with {key}={known[key]!r} or re-quantize the float model with {key}={value!r}")
    cfg = LlamaConfig(**meta["config"])
    with torch.device("meta"):
        model = MinimalLlama(cfg)
    specs = meta["modules"]

    def make(name, lin):
        spec = dict(specs[name])
        cls = LINEAR_CLASSES[spec.pop("class")]
        return cls.empty(lin.in_features, lin.out_features, device="meta", **spec)

    _swap(model, make)
    state = load_file(str(path / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if meta["tied_embedding"]:
        missing = [k for k in missing if not k.startswith("tok_embeddings.")]
    if missing or unexpected:
        raise QuantizationError(f"{path}: model.safetensors does not match quant.json (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}): the files are from different saves")
    for m in quantized_modules(model).values():  # the non-persistent dtype probes are still on meta
        m._dtype_probe = torch.empty(0, device=device)
    model.rope = rope_cache(rope_frequencies(cfg), cfg.max_seq_len).to(device)
    model.quant_config = saved
    return model.eval()
