"""Distributed checkpoints (DCP): every rank writes its own shards, in parallel, and any number of ranks reads them.

A checkpoint directory, as written here:

    step_00000100/
        .metadata          DCP's index: for every tensor, its global shape and which byte range of which file holds
                           which slice (the "chunks"). Written last, by rank 0, from all ranks' plans.
        __0_0.distcp ...   the data: one file per writing rank, holding that rank's shards
        train_state.json   step, data position, world size, model config (ours, written by rank 0)
        rng/rank0.pt ...   each rank's random-number-generator state (ours)

Resharding (N ranks wrote it, M ranks read it) needs no conversion: each reading rank asks for the slices *its*
shards cover (global offsets from its DTensor placement), and DCP's planner finds them in the saved chunks and
reads those byte ranges. M = 1 with a plain, unsharded model asks for whole tensors.

Saves are atomic, with core's save protocol (``minllama.core.saving``): every rank writes into a fresh staging folder
``.step_N.staging-XXXXXXXX/``; when all have finished, rank 0 publishes it. A new ``step_N/`` is one rename of the
whole folder; a ``step_N/`` saved again is replaced through a journal (``step_N/.minllama-publish.json``, written
atomically: the commit) and one rename per file. A kill before the commit leaves the previous checkpoint untouched
and a staging folder that the next save deletes; a kill after it leaves the journal, which every reader here
(``check_checkpoint``, ``load_checkpoint``, ``read_config``, ``CheckpointManager.checkpoints``) finishes before it
reads the folder. So at every instant ``step_N/`` is the old checkpoint or the new one. The newest ``keep``
checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from minllama.core import CheckpointError, LlamaConfig, MinimalLlama, load_pretrained, save_hf, save_meta
from minllama.core.checkpoint import load_plain
from minllama.core.saving import publish, recover, staging_folder
from minllama.core.build import meta_model

from .fsdp import rebuild_rope
from .safe_dcp import read_dcp_metadata, safe_load

STEP_DIR = re.compile(r"step_(\d{8})")
STATE_FILE = "train_state.json"
# The files a save writes into a checkpoint folder (a re-save deletes the previous save's stale ones, e.g. the shard
# of a rank that the new world size no longer has); any other file in the folder is left alone.
_OWNED = re.compile(r"\.metadata|__\d+_\d+\.distcp|train_state\.json|rng/rank\d+\.pt")
# Temporary folders next to a checkpoint NAME: ours, and those of earlier versions (.NAME.tmp: a save's staging;
# .NAME.old: the previous checkpoint, moved aside by a publish made of two renames).
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:staging-[0-9a-f]{8}|tmp|old)")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _dist_kwargs() -> dict:
    """Without a process group, tell DCP so explicitly (one process reads or writes everything)."""
    return {} if dist.is_initialized() else {"no_dist": True}


@contextmanager
def _single_process_ok():
    """DCP warns when it runs without a process group; here that is intended (one process reads or writes it all)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _config_dict(cfg: LlamaConfig) -> dict:
    d = cfg.to_dict()
    d.pop("name", None)
    return d


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ interrupted saves
def _recover(path: Path) -> None:
    """Finish what a killed publish of ``path`` left, before anything reads it. Any number of ranks may run it at
    once on the shared filesystem (each step that another one did already is skipped); cheap when there is
    nothing to do."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():  # an earlier version died between its two renames: put the old one back
        try:
            os.rename(old, path)
        except OSError:
            if not path.is_dir():  # (another rank restored it first otherwise)
                raise CheckpointError(f"{path} is missing and its previous copy {old.name} cannot be moved back: "
                                      "give write access to the folder and load it again") from None
        else:
            warnings.warn(f"{path} was restored from {old.name}, the copy an interrupted save had left")
    if path.is_dir():
        recover(path)  # core's journal: the rest of an interrupted re-save


def _remove_stale(final: Path, keep: Path | None = None) -> None:
    """Delete the temporary folders that interrupted saves of ``final`` left (after ``_recover(final)``: until
    then an ``.old`` one may be the only copy, and the staging folder named by a journal holds the new files)."""
    for p in final.parent.iterdir() if final.parent.is_dir() else ():
        m = _TEMP.fullmatch(p.name)
        if m and m["name"] == final.name and p.is_dir() and p != keep and \
                (not p.name.endswith(".old") or final.exists()):
            shutil.rmtree(p, ignore_errors=True)


def _refuse_foreign(final: Path) -> None:
    """A save replaces only a checkpoint: never a folder holding something else (checked on every rank, from the
    shared filesystem, before any collective, so that all ranks raise together)."""
    if final.exists() and not final.is_dir():
        raise CheckpointError(f"refusing to save into {final}: it exists and is not a directory")
    if final.is_dir() and not (final / ".metadata").is_file() and any(final.iterdir()):
        raise CheckpointError(f"refusing to save into {final}: it is not empty and holds no DCP checkpoint "
                              "(.metadata); choose a new or empty directory")


def _begin_save(final: Path, collective: bool = True) -> Path:
    """Rank 0 finishes an interrupted save of ``final``, deletes stale temporaries and makes a fresh staging
    folder; every rank gets its path (or the same CheckpointError). ``collective=False``: this process alone."""
    _refuse_foreign(final)
    answer: list = [None]
    if _rank() == 0 or not collective:
        try:
            _recover(final)
            _remove_stale(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = staging_folder(final)
            staging.mkdir()
            answer = [str(staging)]
        except (OSError, CheckpointError) as e:
            answer = [CheckpointError(f"cannot save {final}: {e}")]
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], CheckpointError):
        raise answer[0]
    return Path(answer[0])


def _publish(staging: Path, final: Path) -> None:
    """Rank 0 makes the finished staging folder the checkpoint ``final``, with core's protocol: one rename for a
    new folder; journal + a rename per file for one saved again. A kill at any instant leaves old or new."""
    publish(staging, final, owns=_OWNED.fullmatch)


# ---------------------------------------------------------------------------------------------------- checks
def check_checkpoint(path: str | os.PathLike) -> dict:
    """Raise one clear CheckpointError if ``path`` is not a complete checkpoint; else return its train state.

    Runs on every rank *before* any collective, reading only the shared filesystem, so every rank reaches the same
    verdict and raises together: a damaged checkpoint never leaves some ranks waiting in a collective. An
    interrupted save of ``path`` is finished first (``_recover``).
    """
    path = Path(path)
    _recover(path.absolute())
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    state_file, meta_file = path / STATE_FILE, path / ".metadata"
    if not meta_file.is_file() or not state_file.is_file():
        missing = [f.name for f in (meta_file, state_file) if not f.is_file()]
        raise CheckpointError(f"{path} is an incomplete checkpoint (missing {', '.join(missing)}): the save was "
                              "interrupted or the directory is not a DCP checkpoint; load the previous one")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file} is corrupt ({e}): load the previous checkpoint") from None
    _check_train_state(state, state_file)
    metadata = read_dcp_metadata(path)  # never a plain unpickle: a crafted .metadata could run code
    needed: dict[str, int] = {}  # file -> bytes the index says it holds
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path} is incomplete: shard file {name} is missing (was it written by all "
                                  "ranks and copied completely?)")
        if f.stat().st_size < size:
            raise CheckpointError(f"{path}: shard file {name} is truncated ({f.stat().st_size} of {size} bytes): "
                                  "load the previous checkpoint")
    state["_keys"] = sorted(metadata.state_dict_metadata)
    return state


def _check_train_state(state, file: Path) -> None:
    """train_state.json must be an object whose step is a whole number and whose config (ours) builds a config."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a JSON {type(state).__name__}, not an object: not written by "
                              "minllama.dist (load the previous checkpoint)")
    step = state.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{file}: 'step' is {step!r}, not a whole number >= 0: load the previous checkpoint")
    if "config" in state:
        _config_from_state(state["config"], file)


def _config_from_state(d, file: Path) -> LlamaConfig:
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: 'config' is a JSON {type(d).__name__}, not an object")
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], dict):
        raise CheckpointError(f"{file}: 'config.rope_scaling' is {d['rope_scaling']!r}, not an object or null")
    try:
        return LlamaConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: 'config' is not a valid model config ({e})") from None


def _load_rng(file: Path) -> dict:
    """A rank's RNG state: tensors only (weights_only), refused with a clear error otherwise."""
    state = load_plain(file, "an RNG state")
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor) \
            or state["cpu"].dtype != torch.uint8:
        raise CheckpointError(f"{file} does not hold an RNG state: load the previous checkpoint")
    return state


# ------------------------------------------------------------------------------------------------ save / load
def _state(model, optimizer) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _write_side_files(tmp: Path, model: MinimalLlama, train_state: dict) -> None:
    """Each rank's RNG state, and (rank 0) the train state and model config."""
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{_rank()}.pt")
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        state = {**train_state, "world_size": world, "config": _config_dict(model.config)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def save_checkpoint(path: str | os.PathLike, model: MinimalLlama, optimizer=None, train_state: dict | None = None,
                    ) -> Path:
    """Save model (+ optimizer) + train state to ``path`` atomically; every rank calls it. Returns ``path``.

    ``path`` may hold a checkpoint already (it is replaced: a kill at any moment leaves the old one or the new one);
    a non-empty folder holding no checkpoint is refused. Files in ``path`` that a save does not write are kept."""
    final = Path(path).absolute()
    tmp = _begin_save(final)
    _write_side_files(tmp, model, train_state or {})
    with _single_process_ok():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), **_dist_kwargs())
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        _publish(tmp, final)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: MinimalLlama, optimizer=None) -> dict:
    """Load ``path`` into ``model`` (sharded or not, any world size) and ``optimizer``; returns the train state.

    Restores this rank's RNG state when the checkpoint has one for it (same or larger world size).
    ``state["optimizer_restored"]`` says whether optimizer state was in the checkpoint (converted checkpoints hold
    weights only).
    """
    path = Path(path)
    state = check_checkpoint(path)
    keys = state.pop("_keys")
    if state.get("config") is not None and state["config"] != _config_dict(model.config):
        diff = {k: (v, state["config"].get(k)) for k, v in _config_dict(model.config).items()
                if state["config"].get(k) != v}
        raise CheckpointError(f"{path} holds another model: config differs in {diff} (model, checkpoint)")
    with_optim = optimizer is not None and any(k.startswith("optim.") for k in keys)  # DCP flattens nested keys
    target = _state(model, optimizer if with_optim else None)
    safe_load(target, path, **_dist_kwargs())  # DCP gathers every rank's errors, so all ranks raise together
    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        set_model_state_dict(model, target["model"])
    rng = path / "rng" / f"rank{_rank()}.pt"
    if rng.is_file():
        _set_rng_state(_load_rng(rng))
    state["optimizer_restored"] = with_optim
    return state


@dataclass
class CheckpointManager:
    """Periodic checkpoints under ``root``: ``step_00000100/``, ...; keeps the newest ``keep``.

    With ``async_save`` the tensors are copied to CPU memory and written by a background thread while training
    goes on; the checkpoint is published (renamed into place) at the next ``save`` or ``wait()``. The background
    writer talks over its own gloo group so that its collectives never interleave with the training's.
    """

    root: Path
    keep: int = 2
    async_save: bool = False
    _pending: tuple | None = field(default=None, repr=False)
    _group: object = field(default=None, repr=False)

    def __post_init__(self):
        self.root = Path(self.root).absolute()
        if self.keep < 1:
            raise ValueError("keep must be at least 1: the last good checkpoint is what a resume needs")
        if self.async_save and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # collective: every rank creates the manager

    def checkpoints(self) -> list[Path]:
        """Published checkpoints, oldest first (temp directories of unfinished saves are not listed). A save that
        was killed while it published is finished first, so every folder listed is a whole checkpoint."""
        if not self.root.is_dir():
            return []
        for p in list(self.root.iterdir()):  # an earlier version's publish, killed between its two renames
            m = _TEMP.fullmatch(p.name)
            if m and p.name.endswith(".old") and STEP_DIR.fullmatch(m["name"]):
                _recover(self.root / m["name"])
        found = sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name))
        for p in found:
            _recover(p)
        return found

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, model: MinimalLlama, optimizer=None, train_state: dict | None = None) -> None:
        self.wait()
        final = self.root / f"step_{step:08d}"
        if not self.async_save:
            save_checkpoint(final, model, optimizer, {"step": step, **(train_state or {})})
            self._prune()
            return
        tmp = _begin_save(final)
        _write_side_files(tmp, model, {"step": step, **(train_state or {})})
        future = dcp.async_save(_state(model, optimizer), checkpoint_id=str(tmp), process_group=self._group,
                                **_dist_kwargs())
        self._pending = (future, tmp, final)

    def wait(self) -> None:
        """Finish a pending asynchronous save and publish it (every rank calls it)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        result = future.result()
        if hasattr(result, "upload_completion"):  # newer PyTorch: staging and upload are two futures
            result.upload_completion.result()
        _barrier()
        if _rank() == 0:
            _publish(tmp, final)
        _barrier()
        self._prune()

    def _prune(self) -> None:
        if _rank() == 0:
            for old in self.checkpoints()[:-self.keep]:  # (checkpoints() finished any interrupted publish)
                doomed = old.with_name(f".{old.name}.tmp")  # renamed first: a kill mid-delete lists no half folder
                shutil.rmtree(doomed, ignore_errors=True)
                os.rename(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
            names = {m["name"] for p in self.root.iterdir() if (m := _TEMP.fullmatch(p.name))}
            for name in names:  # temporaries of interrupted saves (only the pending one is in flight)
                if STEP_DIR.fullmatch(name):
                    _remove_stale(self.root / name, keep=self._pending[1] if self._pending else None)
        _barrier()

    def load_latest(self, model: MinimalLlama, optimizer=None) -> dict | None:
        """Load the newest published checkpoint; None when there is none (a fresh run)."""
        latest = self.latest()
        return None if latest is None else load_checkpoint(latest, model, optimizer)


# ----------------------------------------------------------------------------- conversion to and from core formats
def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The model config stored in a checkpoint written here, checked against the names and shapes of the tensors
    the checkpoint holds (whether the head is tied shows only in the values: ``dcp_to_model`` checks that)."""
    state = check_checkpoint(path)
    if "config" not in state:
        raise CheckpointError(f"{path}/{STATE_FILE} has no model config: not written by minllama.dist")
    cfg = _config_from_state(state["config"], Path(path) / STATE_FILE)
    _check_config_fits(cfg, Path(path))
    return cfg


def _check_config_fits(cfg: LlamaConfig, path: Path) -> None:
    """The stored config must describe the tensors the index lists (names and shapes), checked on the meta device
    before a full model is allocated from it: a damaged config must not allocate 2**40 embedding rows or 10**9
    layers, nor build a model that the load then fills only in part."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {k.removeprefix("model."): tuple(md.size) for k, md in read_dcp_metadata(path).state_dict_metadata.items()
             if k.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    where = f"{path / STATE_FILE}: 'config'"
    layers = {m.group(1) for k in saved if (m := re.match(r"layers\.(\d+)\.", k))}
    if cfg.n_layers > len(layers):
        raise CheckpointError(f"{where} has {cfg.n_layers} layers, the checkpoint holds {len(layers)}: the config "
                              "does not match the weights")
    try:
        expected = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{where} describes a model that cannot be built ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    for k in sorted(expected.keys() | saved.keys()):
        if expected.get(k) != saved.get(k):
            raise CheckpointError(f"{where} does not match the weights: tensor {k} is {saved.get(k, 'absent')} in "
                                  f"the checkpoint, {expected.get(k, 'absent')} for the config")


def dcp_to_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> MinimalLlama:
    """Gather a (sharded) DCP checkpoint into one full, unsharded model in this process (any world size wrote it)."""
    cfg = read_config(path)
    model = MinimalLlama(cfg).to(device)
    sd = model.state_dict()
    if cfg.tie_embeddings:  # a head of its own to load into: it must turn out to be the embedding
        sd["output.weight"] = torch.empty_like(sd["output.weight"])
    safe_load({"model": sd}, path, no_dist=True)
    if cfg.tie_embeddings and not torch.equal(sd.pop("output.weight"), sd["tok_embeddings.weight"]):
        raise CheckpointError(f"{Path(path) / STATE_FILE}: the config ties the head to the embedding, but the "
                              "checkpoint holds a different head: the config does not match the weights")
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)
    return model.eval()


def dcp_to_hf(path: str | os.PathLike, out: str | os.PathLike, tokenizer=None) -> None:
    """DCP checkpoint -> HF directory (config.json + model.safetensors) that ``load_pretrained`` and transformers
    read. Needs one full model in memory: the output is a single-file format."""
    save_hf(dcp_to_model(path), out, tokenizer)


def dcp_to_meta(path: str | os.PathLike, out: str | os.PathLike, tokenizer=None) -> None:
    """DCP checkpoint -> Meta directory (params.json + consolidated.00.pth)."""
    save_meta(dcp_to_model(path), out, tokenizer)


def core_to_dcp(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A checkpoint that ``minllama.core.load_pretrained`` reads (HF, Meta, GGUF, a known name) -> DCP (weights
    only, step 0): the starting point of distributed fine-tuning. Runs in one process."""
    model, _ = load_pretrained(source, with_tokenizer=False)
    final = Path(path).absolute()
    tmp = _begin_save(final, collective=False)
    state = {"step": 0, "world_size": 1, "config": _config_dict(model.config), "source": str(source)}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    with _single_process_ok():
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
    _publish(tmp, final)
    return final


def load_pretrained_sharded(source: str | os.PathLike, shard, device: torch.device) -> MinimalLlama:
    """Load a core checkpoint into a sharded model without building the full model on every rank.

    Rank 0 alone reads the checkpoint (one full copy, on the CPU). Every rank builds the model on the ``meta``
    device (no memory), applies ``shard(model)`` (e.g. ``lambda m: apply_fsdp(m, mesh)``), allocates only its
    shards, and then ``set_model_state_dict(..., broadcast_from_rank0=True)`` sends the tensors one at a time from
    rank 0; each rank keeps the slice its shards cover. Peak per rank: its shards + one tensor (rank 0: + the model).
    """

    if _rank() == 0:
        full, _ = load_pretrained(source, with_tokenizer=False)
        cfg = [full.config]
    else:
        full, cfg = None, [None]
    if dist.is_initialized():
        dist.broadcast_object_list(cfg, src=0)  # the other ranks need the shapes before any weight arrives
    model = shard(meta_model(cfg[0]))
    model.to_empty(device=device)
    broadcast_full_state(model, full.state_dict() if full is not None else None)
    del full
    return model


def broadcast_full_state(model: MinimalLlama, full_state: dict | None) -> None:
    """Fill a sharded (already allocated) model from one full state dict held by rank 0 only (None elsewhere).

    Tensors travel one at a time; each rank keeps the slice its shards cover. Rebuilds the rope buffer."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, full_state or {}, options=options)
    rebuild_rope(model)


def init_from_rank0(model: MinimalLlama, seed: int) -> MinimalLlama:
    """Random-initialize a sharded model exactly as ``torch.manual_seed(seed); MinimalLlama(cfg).init_weights()``
    would on one device, whatever the number of ranks: rank 0 draws the full model (on the CPU) and broadcasts it.

    (``materialize(init=True)`` is cheaper, every rank drawing only its shards, but its numbers depend on the
    world size; this one makes runs on 1 and N ranks comparable, which the tests and resumes rely on.)"""
    full = None
    if _rank() == 0:
        torch.manual_seed(seed)
        full = MinimalLlama(model.config)
        full.init_weights()
    broadcast_full_state(model, full.state_dict() if full is not None else None)
    return model
