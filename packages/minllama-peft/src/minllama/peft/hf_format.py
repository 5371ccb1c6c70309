"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter saved here loads with ``PeftModel.from_pretrained(LlamaForCausalLM..., directory)`` on the same base, and
an adapter trained with HF ``peft`` loads here. Two translations happen on the way:

- names: our ``layers.3.attention.wq`` is HF's ``base_model.model.model.layers.3.self_attn.q_proj`` (the name maps
  are core's ``formats.py``), and our ``lora_magnitude`` is peft's ``lora_magnitude_vector``;
- the rotary layout: HF stores the rows of q_proj/k_proj permuted per head (``formats.meta_to_hf_rows``). The
  output rows of B (and DoRA's magnitude) are rows of the weight update, so they get the same permutation.
  A (r, in) acts on the inputs, which are not permuted.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from minllama.core.saving import recover, save_into
from minllama.core.formats import hf_to_meta_rows, hf_to_ours, meta_to_hf_rows, ours_to_hf

from .base import linear_shape
from .lora import (AdapterError, LoraConfig, LoraLinear, add_adapter, adapter_config, adapter_names,
                   adapter_state_dict, target_paths)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_magnitude": ".lora_magnitude_vector"}
_HF_TARGET = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
              "w3": "up_proj", "output": "lm_head"}
# Options of adapter_config.json that change what the adapter computes and that we do not implement.
_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "lora_bias": False, "layer_replication": None, "use_qalora": False,
                "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None}


def hf_module_name(path: str) -> str:
    """Our module path -> the module's name inside HF's PeftModel (layers.0.attention.wq -> ...q_proj)."""
    return _PREFIX + ours_to_hf(f"{path}.weight").removesuffix(".weight")


def our_module_path(hf_name: str) -> str | None:
    """The inverse of ``hf_module_name`` (None if the name is no Llama Linear of ours)."""
    ours = hf_to_ours(hf_name.removeprefix(_PREFIX) + ".weight")
    return None if ours is None else ours.removesuffix(".weight")


def _rows(path: str, kind: str, t: Tensor, model: nn.Module, to_hf: bool) -> Tensor:
    """Permute the output rows of a q/k update (B, magnitude) between Meta's rotary layout (ours) and HF's."""
    cfg = model.config
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(path.rsplit(".", 1)[-1])
    if heads is None or kind == "lora_A":  # A (r, in) acts on the inputs, which are not permuted
        return t
    f = meta_to_hf_rows if to_hf else hf_to_meta_rows
    return f(t.view(t.shape[0], -1), heads).view(t.shape)


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` as HF PEFT files into ``directory`` (with core's ``saving.save_into``: the old adapter
    or the new one survives any crash, and other files in the folder are kept). adapter_model.safetensors also
    keeps a copy of the settings that fix what the weights compute (``_COPIED``): ``load_adapter`` refuses an
    adapter_config.json that disagrees with it."""
    cfg = adapter_config(model, name)
    tensors = {}
    for key, t in adapter_state_dict(model, name).items():
        path, kind = key.rsplit(".", 1)
        tensors[hf_module_name(path) + _SUFFIXES[kind]] = _rows(path, kind, t.to("cpu"), model, to_hf=True).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora, "target_modules": [_HF_TARGET[t] for t in cfg.targets],
        "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED,
    }
    copy = json.dumps({key: config[key] for key in _COPIED})
    target = Path(directory).absolute()
    if target.exists() and not (target / CONFIG_FILE).is_file() and any(target.iterdir()):
        raise AdapterError(f"refusing to write into {target}: it is not empty and holds no {CONFIG_FILE} "
                           "(choose a new or empty directory)")
    with save_into(target, owns=lambda rel: rel in (CONFIG_FILE, WEIGHTS_FILE), marker=CONFIG_FILE,
                   overwrite=True) as tmp:  # a kill at any moment leaves the old adapter or the new one
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", _SETTINGS: copy})
    return target


# The fields of adapter_config.json that decide what the weights compute; save_adapter keeps a copy of them in
# adapter_model.safetensors (metadata _SETTINGS). lora_dropout is left out: it only acts in training.
_COPIED = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "layers_to_transform")
_SETTINGS = "minllama.peft"
_FIELD = {"r": "r", "alpha": "lora_alpha", "use_rslora": "use_rslora", "use_dora": "use_dora",
          "targets": "target_modules", "layers": "layers_to_transform"}  # LoraConfig field -> adapter_config key


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise AdapterError(f"the key {k!r} appears twice")
    return dict(pairs)


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """adapter_config.json -> LoraConfig, refusing the options we do not implement and every value of the wrong
    type or range, with one AdapterError naming the file and the field."""
    path = Path(directory) / CONFIG_FILE
    if Path(directory).is_dir():
        recover(directory)  # finish a save that was killed after its commit
    if not path.is_file():
        raise AdapterError(f"{path} not found: an HF PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}: the file was edited or damaged; re-save the adapter") from None
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as e:
        raise AdapterError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}): re-save the "
                           "adapter") from None
    return config_from_dict(d, path)


def config_from_dict(d, path: str | os.PathLike = CONFIG_FILE) -> LoraConfig:
    """The LoraConfig of an adapter_config.json's content; ``path`` names the file in messages."""
    if not isinstance(d, dict):
        raise AdapterError(f"{path} holds a JSON {type(d).__name__}, not an object: not an adapter config")
    if d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {_show(d['peft_type'])} is not supported; only LORA adapters load")
    for key, default in _UNSUPPORTED.items():
        if d.get(key, default) not in (default, None, {}, False, "none"):
            raise AdapterError(f"{path}: {key}={_show(d[key])} is not supported by minllama.peft; "
                               f"retrain without it or merge the adapter with peft")

    def field(key, ok, want, default=_REQUIRED):
        if key not in d:
            if default is _REQUIRED:
                raise AdapterError(f"{path} lacks the required field {key!r}: not an adapter config, or truncated")
            return default
        if not ok(d[key]):
            raise AdapterError(f"{path}: {key} is {_show(d[key])}, not {want}: the file was edited or damaged; "
                               "restore it or re-save the adapter")
        return d[key]

    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    r = field("r", lambda v: whole(v) and v >= 1, "a whole number >= 1 (the rank)")
    alpha = field("lora_alpha", lambda v: number(v) and 0 < v < math.inf, "a finite number > 0")
    dropout = field("lora_dropout", lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)", 0.0)
    use_rslora = field("use_rslora", lambda v: isinstance(v, bool), "true or false", False)
    use_dora = field("use_dora", lambda v: isinstance(v, bool), "true or false", False)
    layers = field("layers_to_transform", lambda v: v is None or (whole(v) and v >= 0) or (
        isinstance(v, list) and v and all(whole(i) and i >= 0 for i in v)),
        "null, a layer index or a non-empty list of indices", None)
    targets = field("target_modules", lambda v: (isinstance(v, str) and v) or (
        isinstance(v, list) and v and all(isinstance(t, str) for t in v)), "a module name, a regular expression "
        "or a list of names")
    if isinstance(targets, str):  # a regex over module names: keep the Linear kinds it matches
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{path}: target_modules {_show(targets)} is not a regular expression ({e})") from None
        targets = [t for t in _HF_TARGET.values() if rx.search(f"model.layers.0.self_attn.{t}")
                   or rx.search(f"model.layers.0.mlp.{t}") or rx.search(t)]
        if not targets:
            raise AdapterError(f"{path}: target_modules {_show(d['target_modules'])} matches no Llama Linear layer")
    try:
        return LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=tuple(targets), layers=layers,
                          use_rslora=use_rslora, use_dora=use_dora)
    except AdapterError as e:  # an unknown target name
        raise AdapterError(f"{path}: target_modules: {e}") from None


_REQUIRED = object()


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 activate: bool = True) -> LoraConfig:
    """Add the HF PEFT adapter in ``directory`` to ``model`` as adapter ``name``. Everything is checked (every
    config field, names, ranks, shapes and values against this model) before the model is touched."""
    cfg = read_adapter_config(directory)
    config_file = Path(directory) / CONFIG_FILE
    file = Path(directory) / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterError(f"{file} not found (pytorch adapter_model.bin is not supported: re-save with "
                           "safe_serialization=True)")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterError(f"{file} is truncated or not a safetensors file ({e}): re-save the adapter") from None
    if _SETTINGS in metadata:  # saved by save_adapter: the config must be the one the weights were saved with
        _check_copy(cfg, metadata[_SETTINGS], config_file, file)
    if name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter {name!r}: load this one under another name, or "
                           "delete_adapter the old one first")
    n_layers = len(model.layers)
    bad = [i for i in cfg.layers or () if i >= n_layers]
    if bad:
        raise AdapterError(f"{config_file}: layers_to_transform names layer(s) {bad}, but the model has {n_layers} "
                           f"layers (0..{n_layers - 1}): the adapter was trained on another base model")
    found: dict[str, Tensor] = {}
    unexpected = []
    for key, t in raw.items():
        if key.endswith(".base_layer.weight"):
            continue  # peft stores a copy of a targeted head/embedding's base weight: we have it already
        kind = next((k for k, suffix in _SUFFIXES.items() if key.endswith(suffix)), None)
        path = None if kind is None else our_module_path(key.removesuffix(_SUFFIXES[kind]))
        if path is None:
            unexpected.append(key)
        else:
            found[f"{path}.{kind}"] = t
    paths = target_paths(model, cfg)
    kinds = ("lora_A", "lora_B") + (("lora_magnitude",) if cfg.use_dora else ())
    expected = [f"{p}.{k}" for p in paths for k in kinds]
    missing = [hf_module_name(k.rsplit(".", 1)[0]) + _SUFFIXES[k.rsplit(".", 1)[1]]
               for k in expected if k not in found]
    unexpected += [hf_module_name(k.rsplit(".", 1)[0]) + _SUFFIXES[k.rsplit(".", 1)[1]]
                   for k in found if k not in expected]
    if missing or unexpected:
        msg = f"{file} does not match its {CONFIG_FILE} (targets {list(cfg.targets)}, {len(model.layers)} layers):"
        if missing:
            msg += f" missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])};"
        if unexpected:
            msg += f" {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])};"
        raise AdapterError(msg + " is the file incomplete, or from another model?")
    for p in paths:
        try:
            out_f, in_f = _shape_of(model.get_submodule(p))
        except (AttributeError, TypeError) as e:
            raise AdapterError(f"{config_file}: target_modules asks for {hf_module_name(p)}, which this model does "
                               f"not have as a Linear layer ({e})") from None
        want = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r), "lora_magnitude": (out_f,)}
        for k in kinds:
            t = found[f"{p}.{k}"]
            got = tuple(t.shape)
            hf = hf_module_name(p) + _SUFFIXES[k]
            if got != want[k]:
                rank_axis = {"lora_A": 0, "lora_B": 1}.get(k)  # the other axis must fit the base layer
                if rank_axis is not None and len(got) == 2 and got[1 - rank_axis] == want[k][1 - rank_axis]:
                    raise AdapterError(f"{file}: {hf} has rank {got[rank_axis]} but {CONFIG_FILE} says r={cfg.r}: "
                                       "the config and the weights are from different adapters")
                raise AdapterError(f"{file}: {hf} has shape {got}, but this model's {p} needs {want[k]} "
                                   f"(in={in_f}, out={out_f}): the adapter was trained on another base model")
            if not t.is_floating_point():
                raise AdapterError(f"{file}: tensor {hf} is stored as {str(t.dtype).removeprefix('torch.')}, not "
                                   "as floats: the file is damaged; re-save the adapter")
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{file}: tensor {hf} holds NaN or Inf values: the file is damaged, or the "
                                   "training diverged; use an earlier checkpoint of the adapter")
    add_adapter(model, cfg, name, activate=activate)
    with torch.no_grad():
        for p in paths:
            m = model.get_submodule(p)
            for k in kinds:
                param = getattr(m, k)[name]
                param.copy_(_rows(p, k, found[f"{p}.{k}"], model, to_hf=False).to(param.dtype))
    return cfg


def _check_copy(cfg: LoraConfig, text: str, config_file: Path, file: Path) -> None:
    """adapter_config.json must say what the weights were saved with: a valid but different lora_alpha or
    use_rslora would load and quietly change every output."""
    try:
        copy = json.loads(text)
    except (ValueError, RecursionError):
        copy = None
    if not isinstance(copy, dict):
        raise AdapterError(f"{file}: the copy of the adapter's settings in its header ({_SETTINGS!r}) is not a "
                           "JSON object: the header is damaged; re-save the adapter")
    saved = config_from_dict({**{k: v for k, v in copy.items() if k in _COPIED}, "lora_dropout": cfg.dropout},
                             f"{file} (its copy of the settings)")
    for key, json_key in _FIELD.items():
        if getattr(cfg, key) != getattr(saved, key):
            raise AdapterError(f"{config_file} and {file.name} disagree on {json_key}: {CONFIG_FILE} says "
                               f"{_show(_as_json(cfg, key))}, {file.name} was saved with "
                               f"{_show(_as_json(saved, key))}: one file was edited or damaged, or they come from "
                               "different saves; restore them or re-save the adapter")


def _as_json(cfg: LoraConfig, key: str):
    value = getattr(cfg, key)
    if key == "targets":
        return [_HF_TARGET[t] for t in value]
    return list(value) if isinstance(value, tuple) else value


def _shape_of(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a target layer, already wrapped (another adapter on it) or not."""
    return (module.out_features, module.in_features) if isinstance(module, LoraLinear) else linear_shape(module)
