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

It also checks what DCP itself takes on trust, so that a damaged checkpoint is an error and never wrong values:

* the index: every tensor's chunks lie inside it, do not overlap and cover it whole (DCP would leave an uncovered
  part of a tensor as it was: the fresh model's random weights), and no two items share bytes of a file;
* every item read: its bytes match the CRC-32s that ``torch.save`` wrote into it (torch.load never checks them).

A refusal is a ``CheckpointError`` naming the file and what it tried to load.
"""
from __future__ import annotations

import io
import math
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element

from minllama.core import CheckpointError
from minllama.core.checkpoint import inside, load_plain, verify_zip

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
    try:
        for info in (metadata.storage_data or {}).values():
            inside(path, getattr(info, "relative_path", None), meta_file)  # no absolute paths, no ..
        _check_index(metadata, meta_file)
    except (AttributeError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{meta_file} is corrupt (a malformed index: {type(e).__name__}: {e}): load the "
                              "previous checkpoint") from None
    return metadata


def _whole(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _check_index(metadata: dcp_metadata.Metadata, meta_file: Path) -> None:
    """The chunks of every tensor tile it exactly, and the items' byte ranges in each file are disjoint."""
    def bad(what: str):
        raise CheckpointError(f"{meta_file} is corrupt: {what}; load the previous checkpoint")

    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, dcp_metadata.TensorStorageMetadata):
            continue
        size = tuple(md.size)
        if not all(_whole(n) for n in size):
            bad(f"{fqn} has the size {size}")
        boxes = []
        for chunk in md.chunks:
            start, extent = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(start) != len(size) or len(extent) != len(size) or not all(map(_whole, start + extent)) or \
                    any(a + b > n for a, b, n in zip(start, extent, size)):
                bad(f"a chunk of {fqn} (offsets {start}, sizes {extent}) does not lie inside its size {size}")
            if math.prod(extent):
                boxes.append((start, extent))
        covered = sum(math.prod(e) for _, e in boxes)
        if covered != math.prod(size):
            bad(f"the chunks of {fqn} hold {covered} of its {math.prod(size)} elements")
        boxes.sort()
        active: list = []  # a sweep along dimension 0: only boxes whose rows overlap are compared
        for box in boxes:
            if size:
                active = [a for a in active if a[0][0] + a[1][0] > box[0][0]]
            for other in active:
                if all(a < b + m and b < a + n for a, n, b, m in zip(box[0], box[1], other[0], other[1])):
                    bad(f"two chunks of {fqn} overlap (offsets {other[0]} and {box[0]})")
            active.append(box)
    ranges: dict[str, list] = {}
    for index, info in (metadata.storage_data or {}).items():
        if not (_whole(info.offset) and _whole(info.length)):
            bad(f"the bytes of {index.fqn} are at offset {info.offset!r}, length {info.length!r}")
        ranges.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length, index.fqn))
    for name, spans in ranges.items():
        spans.sort()
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:
                bad(f"{first} and {second} claim the same bytes of {name}")


class SafeReader(FileSystemReader):
    """DCP's file reader, but its index is read by ``read_dcp_metadata``, and every item's bytes are checked
    against their CRC-32s before torch.load sees them."""

    def _slice_file(self, file, sinfo) -> io.BytesIO:
        view = super()._slice_file(file, sinfo)
        if getattr(sinfo, "transform_descriptors", None):
            return view  # compressed by a storage extension: not a torch.save zip until it is undone
        data = view.read()
        where = f"{Path(self.path) / sinfo.relative_path} (bytes {sinfo.offset}..{sinfo.offset + sinfo.length})"
        if len(data) != sinfo.length:
            raise CheckpointError(f"{where} is truncated: load the previous checkpoint")
        verify_zip(io.BytesIO(data), where, legacy_ok=False)
        return io.BytesIO(data)

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
        inners = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
        for inner in inners:  # (exception, traceback) per failed rank
            if isinstance(inner, CheckpointError):
                raise CheckpointError(str(inner)) from None
        cause = inners[0] if inners and isinstance(inners[0], BaseException) else e  # not DCP's traceback text
        first = (str(cause).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot load {path}: {type(cause).__name__}: {first[:500]} (a damaged or "
                              "incomplete checkpoint?)") from None
