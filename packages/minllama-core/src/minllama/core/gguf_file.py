"""A GGUF file (llama.cpp's format), read in one pass over its header, and its tensors turned into PyTorch ones.

Everything is little-endian. The file is a header, then the tensors' bytes:

    "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv      x  key (string) | value type u32 | value            the metadata: config, tokenizer, chat template
    n_tensors x  name (string) | n_dims u32 | n_dims x u64 | type u32 | offset u64      dims innermost first
    zero padding up to a multiple of ``general.alignment`` (32 if absent), then the data: tensor i at start+offset_i

A string is its length (u64) then UTF-8 bytes; an array is the items' type (u32), their count (u64), the items.
The tensor data is never parsed: the file is memory-mapped and a tensor is a view of its bytes until it is
converted. Why not the ``gguf`` package's ``GGUFReader``? It builds a numpy view for every metadata item (two per
token of a 49k-token vocabulary: seconds before the first tensor), and dequantizes in numpy; here the header takes
milliseconds and the blocks are dequantized by PyTorch, straight into the dtype the model wants.

Quantized tensors are blocks of 32 weights (llama.cpp's ggml-common.h): a row of K weights is K/32 blocks.

    Q8_0  34 bytes: d (fp16) | 32 x int8 q                         w = d * q
    Q4_0  18 bytes: d (fp16) | 16 bytes, two 4-bit codes per byte   w = d * (q - 8)
    Q4_1  20 bytes: d (fp16) | m (fp16) | 16 bytes of codes         w = d * q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high nibble (not 2j and 2j+1).
Other types (K-quants, ...) are dequantized by the ``gguf`` package's numpy code, slower but complete.
"""
from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


class GGMLType(IntEnum):
    """The tensor types of llama.cpp's common files (their numbers in ggml.h); values equal the ``gguf`` package's
    ``GGMLQuantizationType``. A type not listed here (the i-quants...) is looked up in that package, imported then:
    importing it costs ~30 ms and 3 MB, which a file of these types does not need."""
    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
    Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
    BF16 = 30


# type -> (weights per block, bytes per block): a float type is a "block" of one weight
TYPE_SIZES = {GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.Q4_0: (32, 18),
              GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24), GGMLType.Q8_0: (32, 34),
              GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144),
              GGMLType.Q5_K: (256, 176), GGMLType.Q6_K: (256, 210)}


def ggml_type(raw: int) -> tuple[IntEnum, int, int]:
    """(type, weights per block, bytes per block) of a tensor type number; ValueError if no one knows it."""
    try:
        kind = GGMLType(raw)
        return (kind, *TYPE_SIZES[kind])
    except ValueError:  # not one of ours
        import gguf

        kind = gguf.GGMLQuantizationType(raw)
        return (kind, *gguf.GGML_QUANT_SIZES[kind])


FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# metadata value types (gguf.GGUFValueType) -> struct format of one scalar
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost (contiguous) dimension first; PyTorch's is the reverse
    tensor_type: IntEnum  # a GGMLType, or the gguf package's GGMLQuantizationType for the others
    data_offset: int  # absolute position of its first byte in the file
    n_bytes: int
    # The file's mapping and size, not the GGUFFile: a tensor pointing back at the file that lists it would be a
    # reference cycle, and the mapping (the pages read so far) would stay until the garbage collector's next pass.
    buffer: mmap.mmap | bytes
    file_size: int

    def raw(self) -> Tensor:
        """The stored bytes, uint8 (rows, bytes per row): a view of the memory-mapped file, nothing is copied."""
        rows = int(np.prod(self.shape[1:], dtype=np.int64))
        data = torch.frombuffer(self.buffer, dtype=torch.uint8, count=self.n_bytes, offset=self.data_offset)
        return data.view(rows, -1)

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Give the file pages this tensor was read from (its bytes ``start:end``, all by default) back to the OS
        (they stay in the page cache, and would be read again if touched): a loaded model does not keep the file's
        bytes resident as well as its own."""
        end = self.n_bytes if end is None else min(end, self.n_bytes)
        if isinstance(self.buffer, mmap.mmap) and end > start:
            first = self.data_offset + start
            first -= first % mmap.PAGESIZE
            last = min(self.data_offset + end, self.file_size)
            self.buffer.madvise(mmap.MADV_DONTNEED, first, last - first)

    def qtype(self) -> str | None:
        """'q8_0', 'q4_0' or 'q4_1' for the block types PyTorch dequantizes here; None otherwise."""
        name = self.tensor_type.name.lower()
        return name if name in BLOCK_BYTES else None


class GGUFFile:
    """``GGUFFile(path)``: ``fields`` ({key: Python value}), ``tensors`` (list of GGUFTensor), ``data_offset``,
    ``alignment``, ``size``. A damaged header is a ValueError saying what is wrong at which byte."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # ACCESS_COPY: a private mapping, so views of it are writable tensors (torch warns on read-only
            # buffers); nothing is ever written, and the file itself could not be changed through it anyway.
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        self.size, self.pos = size, 0
        if self._bytes(4) != b"GGUF":
            raise ValueError("not a GGUF file (it does not start with the bytes 'GGUF')")
        version = self._read("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._read("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]  # (name, shape, type, offset in the data, bytes)
        if len({info[0] for info in infos}) != len(infos):
            raise ValueError("two tensors have the same name")
        self.alignment = self.fields.get("general.alignment", 32)
        if not isinstance(self.alignment, int) or isinstance(self.alignment, bool) or not 0 < self.alignment <= 2**16:
            raise ValueError(f"general.alignment = {self.alignment!r} is not a small positive integer")
        self.data_offset = self.pos + (-self.pos) % self.alignment
        self.tensors = [GGUFTensor(name, shape, kind, self.data_offset + offset, n_bytes, self.buffer, size)
                        for name, shape, kind, offset, n_bytes in infos]

    # -- the header, field by field
    def _bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"the file ends at byte {self.size}, inside the header (reading {n} bytes at "
                             f"{self.pos}): truncated")
        out = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return out

    def _read(self, fmt: str):
        return struct.unpack("<" + fmt, self._bytes(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        at = self.pos
        raw = self._bytes(self._read("Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"the string at byte {at} is not UTF-8") from None

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALAR:
            return self._read(_SCALAR[vtype])
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")
        item, count = self._read("I"), self._read("Q")
        if item in _SCALAR and item != 7:  # numbers: one numpy read for the whole array (a vocabulary's scores)
            dtype = np.dtype("<" + _SCALAR[item])
            return np.frombuffer(self._bytes(count * dtype.itemsize), dtype).tolist()
        if item == _STRING:
            return self._strings(count)
        return [self._value(item) for _ in range(count)]

    def _strings(self, count: int) -> StringArray:
        """An array of strings (a vocabulary: 49k tokens, 48k merges): where each one starts, in one tight loop."""
        buffer, pos, size, starts = self.buffer, self.pos, self.size, array("Q")
        length_at = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                break
            starts.append(pos)
            pos += 8 + length_at(buffer, pos)[0]
            if pos > size:
                break
        if len(starts) < count or pos > size:
            self._bytes(size + 1)  # past the end: the truncation error
        starts.append(pos)
        self.pos = pos
        return StringArray(buffer, starts)

    def _tensor_info(self) -> tuple:
        name, n_dims = self._string(), self._read("I")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)")
        shape = tuple(self._read("Q") for _ in range(n_dims))
        raw_type = self._read("I")
        try:
            tensor_type, block, block_bytes = ggml_type(raw_type)
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has an unknown type {raw_type}") from None
        if shape[0] % block:
            raise ValueError(f"tensor {name!r}: its rows of {shape[0]} are not whole blocks of {block} "
                             f"({tensor_type.name})")
        n_bytes = int(np.prod(shape, dtype=object)) // block * block_bytes
        return name, shape, tensor_type, self._read("Q"), n_bytes


class StringArray(Sequence):
    """A metadata array of strings, each decoded when it is read. A vocabulary's tokens and merges are read once,
    by the tokenizer, after the weights; as lists of str from the moment the file opens they would take ~7 MB (for
    SmolLM2's 2 x 49k strings) through the whole load, and leave holes among the weights when they go. Opening the
    file checks every length; a string that is not UTF-8 is an error when it is read."""

    def __init__(self, buffer, starts: array):
        self._buffer, self._starts = buffer, starts  # string i: 8 bytes of length at starts[i], then its bytes

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"string {i} of an array of {len(self)}")
        i %= len(self)
        try:
            return self._buffer[self._starts[i] + 8:self._starts[i + 1]].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"string {i} of the array at byte {self._starts[0]} is not UTF-8") from None

    def __iter__(self):
        buffer, starts = self._buffer, self._starts
        try:  # all at once: the caller reads the whole array (a tokenizer being built)
            return iter([buffer[i + 8:j].decode("utf-8") for i, j in zip(starts, starts[1:])])
        except UnicodeDecodeError:
            return (self[i] for i in range(len(self)))  # __getitem__ says which string is not UTF-8

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, StringArray)) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


# ------------------------------------------------------------------------------------------- blocks -> floats
def _fp16_at(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 stored at byte ``offset`` of every block: (N, nb, bytes) -> (N, nb) float32."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


def unpack_blocks(raw: Tensor, qtype: str) -> dict[str, Tensor]:
    """Raw bytes (N, nb * block_bytes) -> d (N, nb), m (N, nb) for Q4_1, codes (N, nb * 32) (int8 or 0..15)."""
    N = raw.shape[0]
    blocks = raw.view(N, -1, BLOCK_BYTES[qtype])  # (N, nb, bytes)
    out = {"d": _fp16_at(blocks, 0)}
    if qtype == "q8_0":
        out["codes"] = blocks[..., 2:].contiguous().view(torch.int8).reshape(N, -1)
        return out
    start = 2 if qtype == "q4_0" else 4
    if qtype == "q4_1":
        out["m"] = _fp16_at(blocks, 2)
    qs = blocks[..., start:]  # (N, nb, 16)
    out["codes"] = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, -1)  # weights 0..15 then 16..31 of each block
    return out


def block_scales(raw: Tensor, qtype: str) -> list[Tensor]:
    """The fp16 numbers of every block (d, and m for Q4_1) as float32 (N, nb): the only place a NaN or Inf can be
    (the codes are small integers), so checking these checks the whole tensor."""
    blocks = raw.view(raw.shape[0], -1, BLOCK_BYTES[qtype])
    return [_fp16_at(blocks, 0)] + ([_fp16_at(blocks, 2)] if qtype == "q4_1" else [])


def dequantize_blocks(raw: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw GGUF bytes (N, nb * block_bytes) -> weights (N, nb * 32) in ``dtype`` (computed in float32)."""
    p = unpack_blocks(raw, qtype)
    N, nb = p["d"].shape
    q = p["codes"].view(N, nb, BLOCK).float()  # (N, nb, 32)
    if qtype == "q8_0":
        w = q.mul_(p["d"][..., None])
    elif qtype == "q4_0":
        w = q.sub_(8).mul_(p["d"][..., None])
    else:
        w = q.mul_(p["d"][..., None]).add_(p["m"][..., None])
    return w.view(N, -1).to(dtype)


def to_torch(t: GGUFTensor, dtype: torch.dtype = torch.float32, chunk: int = 1 << 20) -> Tensor:
    """A GGUF tensor as a new PyTorch tensor in ``dtype``, in PyTorch's shape (dims reversed); never a view of the
    file, so the file can be closed (or replaced) afterwards. Blocks are dequantized ``chunk`` weights at a time
    into the result, and the file pages of each chunk are released once it is done, so the temporaries stay a few
    MB even for a 100 MB embedding (peak memory of loading is the model, not the model plus its largest tensor twice;
    16 MB chunks left ~30 MB more of the heap resident after SmolLM2's embedding)."""
    shape = tuple(reversed(t.shape))
    name = t.tensor_type.name
    if name in FLOATS:
        out = t.raw().view(FLOATS[name]).view(shape).to(dtype, copy=True)
    elif t.qtype():
        raw = t.raw()  # (N, bytes per row)
        out = torch.empty(raw.shape[0], shape[-1], dtype=dtype)
        rows = max(1, chunk // shape[-1])
        for i in range(0, raw.shape[0], rows):
            out[i:i + rows] = dequantize_blocks(raw[i:i + rows], t.qtype())  # copy_ rounds the fp32 to ``dtype``
            t.release(i * raw.shape[1], (i + rows) * raw.shape[1])
        out = out.view(shape)
    else:
        from gguf.quants import dequantize  # K-quants and the rest: numpy, slower

        out = torch.from_numpy(dequantize(t.raw().numpy(), t.tensor_type).reshape(shape)).to(dtype)
    t.release()
    return out
