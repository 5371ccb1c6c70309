"""Quantize a whole MinimalLlama by swapping its modules, and save / load the result.

    quantize(model, "int8")                         every nn.Linear -> Int8Linear (in place, returns the model)
    quantize(model, "int4", group_size=64)          ... Int4Linear; "nf4" (double_quant=True), "fp8",
    quantize(model, "q8_0")                         ... or GGUF blocks: "q8_0", "q4_0", "q4_1"
    quantize(model, "int4", group_size=32, head="int8")     the output head (and tied embedding) at 8 bits
    model, tok = load_pretrained_quantized("smollm2-135m-instruct", "int8")   loaded layer by layer, no fp32 copy
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
from safetensors import safe_open
from safetensors.torch import save_file

from minllama.core.config import LlamaConfig
from minllama.core.build import meta_model
from minllama.core.checkpoint import load_pretrained
from minllama.core.model import MinimalLlama
from minllama.core.saving import recover, recover_legacy, save_into

from . import gguf_blocks
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


def _swap(model: MinimalLlama, make, under: str = "") -> None:
    """Replace every nn.Linear (by name) with make(name, linear) in the submodule ``under``, itself included ("":
    the whole model). When the head is swapped ("" or "output"), a tied embedding then reads the quantized head."""
    tied = under in ("", "output") and (model.output.weight is model.tok_embeddings.weight
                                        or model.config.tie_embeddings)
    linears = [(name, m) for name, m in model.get_submodule(under).named_modules(prefix=under)
               if isinstance(m, nn.Linear)]
    for name, linear in linears:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(name, linear))
    if tied and isinstance(model.output, QuantLinear):
        model.tok_embeddings = QuantEmbedding(model.output)


def _quantizer(scheme: str, head: str | None, options: dict):
    """``quantize``'s module maker, make(name, linear) -> quantized module, and the model's ``quant_config``; a
    wrong scheme or option is refused here, before any weight is touched."""
    cls, opts = scheme_options(scheme, **options)
    head_cls, head_opts = scheme_options(head) if head is not None else (cls, opts)

    def make(name, lin):
        c, o = (head_cls, head_opts) if name == "output" else (cls, opts)
        return c.from_weight(lin.weight, **o).to(lin.weight.device)

    return make, {"scheme": scheme, **opts, **({"head": head} if head is not None else {})}


def quantize(model: MinimalLlama, scheme: str, head: str | None = None, **options) -> MinimalLlama:
    """Quantize every linear layer of ``model`` in place (see the module docstring); returns the model.

    ``head`` quantizes the output head (and so a tied embedding) with another scheme, at its default options:
    llama.cpp's 4-bit files keep that matrix at 6-8 bits, because every logit, and every token's embedding, goes
    through it. ``quantize(model, "int4", group_size=32, head="int8")`` costs 11 MiB more on SmolLM2."""
    make, config = _quantizer(scheme, head, options)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantizationError("the model is already quantized: quantize a float model (load it again)")
    _swap(model, make)
    model.quant_config = config
    return model


def load_pretrained_quantized(source: str | os.PathLike, scheme: str, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu", *, head: str | None = None,
                              with_tokenizer: bool = True, **options) -> tuple[MinimalLlama, object | None]:
    """(model, tokenizer) as ``load_pretrained(source, dtype, device)`` then ``quantize(model, scheme, head,
    **options)`` give them, the same numbers, without ever holding the float model: core's loader hands over the
    head (with the embedding, which a tied head shares) and then each decoder layer as soon as its tensors are read
    (its ``convert`` hook), and each is quantized before the next is read. So the float weights in memory are the
    embedding's first, then one layer's at a time (SmolLM2 in int8: weights of ~150 MB at the peak, the fp32
    embedding with its int8 copy or the quantized model with one fp32 layer, where quantizing after loading holds
    all 538 MB of fp32 first).
    ``source``: what ``load_pretrained`` takes (a .gguf file, an HF or Meta directory, a known name)."""
    make, config = _quantizer(scheme, head, options)

    def convert(model: MinimalLlama, part: str) -> None:
        if part:  # "" (the model complete) comes last, when every part is quantized already
            _swap(model, make, under=part)

    model, tokenizer = load_pretrained(source, dtype, device, with_tokenizer, convert=convert)
    model.quant_config = config
    return model, tokenizer


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
        save_file(state, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", _SETTINGS: json.dumps(_settings(meta), sort_keys=True)})
        (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def load_quantized(directory: str | os.PathLike, scheme: str | None = None, device="cpu",
                   **expected_options) -> MinimalLlama:
    """Load a ``save_quantized`` directory. ``scheme`` and options (e.g. group_size=64), when given, must match
    what was saved: a model quantized otherwise is refused with a clear error rather than silently used.

    Everything is checked before the model is built (see "What happens when things go wrong" in the README): a
    damaged, truncated, edited or mismatched file is one ``QuantizationError`` naming the file, the field or
    tensor, and what to do; an interrupted save that cannot be finished is core's ``CheckpointError``."""
    path = Path(directory)
    if recover_legacy(path.absolute()):  # an earlier version's save was killed between its two renames
        warnings.warn(f"{path} was restored from the copy an interrupted save had left in .{path.name}.old-*")
    if path.is_dir():
        recover(path)  # a save killed after its commit is finished first: never a mix of two saves
    file, weights = path / QUANT_FILE, path / WEIGHTS_FILE
    if not file.is_file():
        raise QuantizationError(f"{path} has no quant.json: not a save_quantized checkpoint")
    meta = _read_json(file)
    handle = _open_weights(weights)
    copy = _saved_settings(handle, weights)
    diff = None if copy is None else _difference(_settings(meta), copy)
    if diff is not None:
        where, ours, theirs = diff
        raise QuantizationError(f"{file} and {weights.name} disagree on {where}: quant.json says {_show(ours)}, "
                                f"{weights.name} was saved with {_show(theirs)} (it keeps a copy of the settings "
                                "that give its numbers their meaning): one file was edited or damaged, or they "
                                "come from different saves; restore them or re-save the model")
    saved, cfg, specs = _check_meta(meta, file)
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
    model = _build(cfg, specs, set(handle.keys()), file, weights)
    state, dtype = _read_tensors(model, handle, weights)
    model.load_state_dict({k: t.to(device) for k, t in state.items()}, strict=False, assign=True)
    for m in quantized_modules(model).values():  # the non-persistent dtype probes are still on meta
        m._dtype_probe = torch.empty(0, device=device, dtype=dtype)
    model.reset_rope(device)
    model.quant_config = saved
    return model.eval()


# What quant.json holds, in the order the loader checks it. Each check names the file and the field.
_SETTINGS = "minllama.quant"  # model.safetensors' metadata: a copy of quant.json's settings
_SETTING_KEYS = ("format_version", "quantization", "config", "modules", "tied_embedding")
_OPTION_VALUES = {"group_size": (32, 64, 128, 256), "double_quant": (False, True), "qtype": gguf_blocks.QTYPES}
_MISSING = object()


def _show(value) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _settings(meta) -> dict:
    """What quant.json says about the weights: every field but the model's name (a label). model.safetensors keeps
    a copy, so that an edited or damaged quant.json cannot make the same numbers compute something else."""
    out = {k: meta[k] for k in _SETTING_KEYS if isinstance(meta, dict) and k in meta}
    if isinstance(out.get("config"), dict):
        out["config"] = {k: v for k, v in out["config"].items() if k != "name"}
    return out


def _same(a, b) -> bool:
    """Equal as JSON: 32 is not 32.0 and 1 is not true (Python's == says they are)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _difference(a, b, where: str = ""):
    """The first field where two JSON values differ, as (dotted path, a's value, b's value), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            sub = f"{where}.{key}" if where else key
            if key not in a or key not in b:
                return sub, a.get(key, _MISSING), b.get(key, _MISSING)
            found = _difference(a[key], b[key], sub)
            if found is not None:
                return found
        return None
    return None if _same(a, b) else (where or "the whole file", a, b)


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen.add(key)
    return dict(pairs)


def _read_json(file: Path) -> dict:
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except _Duplicate as e:
        raise QuantizationError(f"{file} has the key {e.args[0]!r} twice: edited or damaged; restore it or re-save "
                                "the model") from None
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as e:
        raise QuantizationError(f"{file} cannot be read as JSON ({type(e).__name__}: {str(e)[:120]}): truncated or "
                                "damaged; restore it or re-save the model") from None
    if not isinstance(meta, dict):
        raise QuantizationError(f"{file} holds a JSON {type(meta).__name__}, not an object: not a save_quantized "
                                "checkpoint (or a damaged one); re-save the model")
    return meta


def _open_weights(weights: Path):
    if not weights.is_file():
        raise QuantizationError(f"{weights} is missing: the checkpoint is incomplete; re-save the model")
    try:
        return safe_open(str(weights), framework="pt")  # reads and checks the header; the data stays on disk
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise QuantizationError(f"{weights} is truncated or not a safetensors file ({type(e).__name__}: "
                                f"{str(e)[:120]}): re-save the model") from None


def _saved_settings(handle, weights: Path) -> dict | None:
    """The copy of quant.json's settings that save_quantized stores in model.safetensors (None: an older save)."""
    text = (handle.metadata() or {}).get(_SETTINGS)
    if text is None:
        return None
    try:
        copy = json.loads(text)
    except (ValueError, RecursionError):
        copy = None
    if not isinstance(copy, dict):
        raise QuantizationError(f"{weights}: the copy of quant.json's settings in its header ({_SETTINGS!r}) is "
                                "not a JSON object: the header is damaged; re-save the model")
    return copy


def _check_meta(meta: dict, file: Path) -> tuple[dict, LlamaConfig, dict]:
    """quant.json's fields, each of the right type and in range, and consistent with one another."""
    version = meta.get("format_version", _MISSING)
    if type(version) is not int or version != FORMAT_VERSION:
        raise QuantizationError(f"{file}: format_version is {_show(version)}, not {FORMAT_VERSION}: written by "
                                "another version of minllama-quant (or damaged); re-save the model with this one")
    for key, kind, what in (("quantization", dict, "an object"), ("config", dict, "an object"),
                            ("modules", dict, "an object"), ("tied_embedding", bool, "true or false")):
        if not isinstance(meta.get(key), kind):
            raise QuantizationError(f"{file}: {key} is {_show(meta.get(key, _MISSING))}, not {what}: edited or "
                                    "damaged; restore it or re-save the model")
    saved = _check_quantization(meta["quantization"], file)
    d = meta["config"]
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
        raise QuantizationError(f"{file}: config.rope_scaling is {_show(d['rope_scaling'])}, not an object or null")
    try:
        cfg = LlamaConfig(**d)
    except (TypeError, ValueError) as e:  # LlamaConfig names the field and the range
        raise QuantizationError(f"{file}: config: {e}: edited or damaged; restore it or re-save the model") from None
    if meta["tied_embedding"] != cfg.tie_embeddings:
        raise QuantizationError(f"{file}: tied_embedding is {_show(meta['tied_embedding'])} but "
                                f"config.tie_embeddings is {_show(cfg.tie_embeddings)}: they always agree in a save; "
                                "the file was edited or damaged")
    specs = meta["modules"]
    for name, spec in specs.items():
        cls = spec.get("class") if isinstance(spec, dict) else None
        if not isinstance(cls, str) or cls not in LINEAR_CLASSES:
            raise QuantizationError(f"{file}: modules.{name} is {_show(spec)}: not an object whose class is one of "
                                    f"{', '.join(LINEAR_CLASSES)}; restore the file or re-save the model")
        want = _expected_spec(name, spec, saved)
        if not _same(spec, want):
            raise QuantizationError(f"{file}: modules.{name} is {_show(spec)}, but quantization "
                                    f"{_show(saved)} makes it {_show(want)}: edited or damaged; re-save the model")
    if saved["scheme"] == "gguf" and sorted({s["qtype"] for s in specs.values()}) != sorted(saved["qtypes"]):
        raise QuantizationError(f"{file}: quantization.qtypes is {_show(saved['qtypes'])}, but the modules use "
                                f"{_show(sorted({s['qtype'] for s in specs.values()}))}: edited or damaged")
    return saved, cfg, specs


def _check_option(value, key: str, where: str, file: Path) -> None:
    allowed = _OPTION_VALUES[key]
    if not any(type(value) is type(a) and value == a for a in allowed):
        raise QuantizationError(f"{file}: {where} is {_show(value)}, not one of {', '.join(map(_show, allowed))}: "
                                "edited or damaged; restore it or re-save the model")


def _check_quantization(q: dict, file: Path) -> dict:
    scheme = q.get("scheme", _MISSING)
    if scheme == "gguf":  # load_gguf_quantized's models: the file's own block types
        extra = sorted(set(q) - {"scheme", "qtypes"})
        qtypes = q.get("qtypes", _MISSING)
        if extra:
            raise QuantizationError(f"{file}: quantization.{extra[0]} is not an option of scheme 'gguf'")
        if not isinstance(qtypes, list) or not qtypes or len({json.dumps(t) for t in qtypes}) != len(qtypes) or \
                not all(isinstance(t, str) and t in gguf_blocks.QTYPES for t in qtypes):
            raise QuantizationError(f"{file}: quantization.qtypes is {_show(qtypes)}, not a list of distinct GGUF "
                                    f"block types ({', '.join(gguf_blocks.QTYPES)})")
        return q
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise QuantizationError(f"{file}: quantization.scheme is {_show(scheme)}, not one of "
                                f"{', '.join(SCHEMES)}, gguf: edited or damaged; restore it or re-save the model")
    _, defaults = SCHEMES[scheme]
    unknown = sorted(set(q) - {"scheme", "head", *defaults})
    if unknown:
        raise QuantizationError(f"{file}: quantization.{unknown[0]} is not an option of scheme {scheme!r} (its "
                                f"options: {', '.join(defaults) or 'none'}): edited or damaged")
    for key, default in defaults.items():
        _check_option(q.get(key, _MISSING), key, f"quantization.{key}", file)
        if key == "qtype" and q[key] != default:
            raise QuantizationError(f"{file}: quantization.qtype is {_show(q[key])} but scheme {scheme!r} "
                                    f"means {_show(default)}: edited or damaged")
    head = q.get("head")
    if head is not None and (not isinstance(head, str) or head not in SCHEMES):
        raise QuantizationError(f"{file}: quantization.head is {_show(head)}, not one of {', '.join(SCHEMES)} "
                                "or null: edited or damaged")
    return q


def _expected_spec(name: str, spec: dict, saved: dict) -> dict:
    """The module spec that ``saved`` (quant.json's quantization) gives the module ``name``."""
    if saved["scheme"] == "gguf":
        qtype = spec.get("qtype")
        return {"class": "GGUFLinear", "qtype": qtype if qtype in saved["qtypes"] else saved["qtypes"]}
    if name == "output" and saved.get("head") is not None:
        cls, opts = SCHEMES[saved["head"]]
    else:
        cls, defaults = SCHEMES[saved["scheme"]]
        opts = {k: saved[k] for k in defaults}
    return {"class": cls.__name__, **opts}


def _build(cfg: LlamaConfig, specs: dict, names: set[str], file: Path, weights: Path) -> MinimalLlama:
    """The model on the meta device, its Linears swapped as quant.json says: no memory, and nothing read yet."""
    stored = 1 + max((int(m.group(1)) for n in names if (m := re.match(r"layers\.(\d{1,9})\.", n))), default=-1)
    if cfg.n_layers > stored:  # before building: a damaged n_layers of 10**9 would build for hours
        raise QuantizationError(f"{file}: config.n_layers is {cfg.n_layers}, but {weights.name} holds "
                                f"{stored} layers: the files are from different saves, or one is damaged")
    try:
        model = meta_model(cfg)
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise QuantizationError(f"{file}: config describes a model that cannot be built ({type(e).__name__}: "
                                f"{str(e)[:120]}): edited or damaged; re-save the model") from None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing, unknown = [n for n in linears if n not in specs], [n for n in specs if n not in linears]
    if unknown:
        raise QuantizationError(f"{file}: modules names {', '.join(unknown[:3])}, which a model of this config "
                                f"({cfg.n_layers} layers) does not have: edited or damaged; re-save the model")
    if missing:
        raise QuantizationError(f"{file}: modules lacks {', '.join(missing[:3])}: every linear layer is listed in "
                                "a save; the file was edited or damaged")

    def make(name, lin):
        spec = dict(specs[name])
        cls = LINEAR_CLASSES[spec.pop("class")]
        return cls.empty(lin.in_features, lin.out_features, device="meta", **spec)

    try:
        _swap(model, make)
    except ValueError as e:  # GGUF blocks need rows of a multiple of 32 weights
        raise QuantizationError(f"{file}: {e}: the config does not fit the modules; re-save the model") from None
    return model


def _read_tensors(model: MinimalLlama, handle, weights: Path) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Every tensor the model needs, checked against it: names, shapes, dtypes, finite values. Returns them and the
    float dtype the model computes in (that of its norms: fp32, or bf16 for a model saved after .to(bf16))."""
    expected = model.state_dict()
    stored = set(handle.keys())
    missing, unexpected = [k for k in expected if k not in stored], sorted(stored - set(expected))
    if missing or unexpected:
        raise QuantizationError(f"{weights} does not match quant.json (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]}): the files are from different saves, or one is damaged")
    for k, want in expected.items():
        shape = tuple(handle.get_slice(k).get_shape())
        if shape != tuple(want.shape):
            raise QuantizationError(f"{weights}: tensor {k} has shape {shape}, but quant.json's config and modules "
                                    f"need {tuple(want.shape)}: the files are from different saves, or one is damaged")
    state = {}
    for k in expected:
        try:
            t = handle.get_tensor(k)
            # safetensors places a tensor where the file has it: an int8 tensor after other int8 tensors may start
            # at any byte, and the int8 kernel (_weight_int8pack_mm) crashes the process on a buffer that is not
            # 16-byte aligned. A copy gets the allocator's 64-byte alignment.
            state[k] = t.clone() if t.data_ptr() % 64 else t
        except Exception as e:
            raise QuantizationError(f"{weights}: cannot read tensor {k} ({type(e).__name__}: {str(e)[:120]}): the "
                                    "file is truncated or damaged; re-save the model") from None
    params = dict(model.named_parameters())  # the float weights (norms, an untied embedding); the rest are codes
    dtypes = {state[k].dtype for k in params}
    dtype = next(iter(dtypes))
    if len(dtypes) != 1 or not dtype.is_floating_point:
        raise QuantizationError(f"{weights}: the float weights (norms{', embedding' if len(params) > 1 else ''}) "
                                f"are stored as {sorted(map(str, dtypes))}, not as one float type: the file is "
                                "damaged; re-save the model")
    modules = quantized_modules(model)
    for k, t in state.items():
        want = expected[k].dtype
        if k not in params and t.dtype != want and not (want.is_floating_point and t.dtype == dtype):
            raise QuantizationError(f"{weights}: tensor {k} is stored as {str(t.dtype).removeprefix('torch.')}, "
                                    f"but {type(modules[k.rsplit('.', 1)[0]]).__name__} keeps it as "
                                    f"{str(want).removeprefix('torch.')}: the file is damaged; re-save the model")
        owner = modules.get(k.rsplit(".", 1)[0])
        if t.is_floating_point():
            values = [t.float() if t.element_size() == 1 else t]  # fp8 codes: isfinite wants a wider type
        elif isinstance(owner, GGUFLinear):
            values = gguf_blocks.block_scales(t, owner.options["qtype"])  # the fp16 scales inside the bytes
        else:
            continue
        if not all(bool(torch.isfinite(v).all()) for v in values):
            raise QuantizationError(f"{weights}: tensor {k} holds NaN or Inf values: the checkpoint is damaged (or "
                                    "the float model had diverged); re-quantize the float model")
    return state, dtype
