"""Reading a DCP checkpoint without letting the checkpoint run code.

DCP stores its index (``.metadata``) as a Python pickle, and non-tensor values (an optimizer's ``lr``, ``betas``)
as ``torch.save`` bytes that its default planner reads with ``weights_only=False``. Unpickling calls whatever
functions the file names, so a crafted checkpoint from the internet could run any command the moment it is
*opened* (before any shape check). This module closes both doors:

* ``SafeReader`` reads ``.metadata`` with an unpickler that can build only DCP's own metadata classes and a few
  plain values (``torch.Size``, dtypes, layouts, paths); any other name in the pickle is refused;
* ``SafePlanner`` reads the byte items with ``torch.load(weights_only=True)`` (plain containers, numbers, strings
  and tensors only);
* every file the index names must lie inside the checkpoint folder (no absolute paths, no ``..``).

A refusal is a ``CheckpointError`` naming the file and what it tried to load.
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element

from minllama.core import CheckpointError
from minllama.core.checkpoint import inside, load_plain

# (module, name) pairs a DCP index may name: its dataclasses and the plain values inside them.
_DCP_CLASSES = {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"}
_ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in _DCP_CLASSES} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # layout name -> torch.strided etc.
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # torch.float32, torch.bfloat16, ...
        raise CheckpointError(f"{self.where} asks to load {module}.{name}, which a DCP index never contains: "
                              "refusing to unpickle it (the checkpoint may be crafted to run code); "
                              "do not use this checkpoint")


def read_dcp_metadata(path: str | Path) -> dcp_metadata.Metadata:
    """The checkpoint's index, read with the restricted unpickler; every file it names is checked to lie inside
    ``path``. Raises CheckpointError for anything else."""
    path = Path(path)
    meta_file = path / ".metadata"
    try:
        with open(meta_file, "rb") as f:
            metadata = _MetadataUnpickler(f, meta_file).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated, not a pickle, wrong classes...
        raise CheckpointError(f"{meta_file} is corrupt ({type(e).__name__}: {e}): load the previous checkpoint") \
            from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{meta_file} holds a {type(metadata).__name__}, not a DCP index: load the previous "
                              "checkpoint")
    for info in (metadata.storage_data or {}).values():
        inside(path, getattr(info, "relative_path", None), meta_file)  # no absolute paths, no ..
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader, but its index is read by ``read_dcp_metadata``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor values are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = load_plain(value, f"the checkpoint's value {read_item.dest_index.fqn}")  # containers, numbers, tensors
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does, with the object already loaded
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict, path: str | Path, **kwargs) -> None:
    """``dcp.load(state, ...)`` through ``SafeReader`` and ``SafePlanner``. DCP wraps every rank's exceptions in
    one CheckpointException (so all ranks raise together); a CheckpointError of ours inside it comes out as
    itself, anything else as one CheckpointError naming the checkpoint."""
    try:
        with warnings.catch_warnings():  # one process without a process group is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)), planner=SafePlanner(),
                     **kwargs)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        for failure in (getattr(e, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
            if isinstance(inner, CheckpointError):
                raise CheckpointError(str(inner)) from None
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {str(e)[:500]}") from None
