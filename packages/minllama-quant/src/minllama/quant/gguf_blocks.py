"""GGUF's Q8_0, Q4_0 and Q4_1 blocks, read straight from the file's bytes (llama.cpp's ggml-common.h layouts).

A row of K weights is cut into K/32 blocks; each block is stored as a few bytes of scale then the codes:

    Q8_0  34 bytes: d (fp16) | 32 x int8 q                         w = d * q
    Q4_0  18 bytes: d (fp16) | 16 bytes, two 4-bit codes per byte   w = d * (q - 8)
    Q4_1  20 bytes: d (fp16) | m (fp16) | 16 bytes of codes         w = d * q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high nibble (not 2j and 2j+1).
A GGUF tensor of shape (N, K) is simply N rows of K/32 blocks: a uint8 array (N, K/32 * block_bytes).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QTYPES = ("q8_0", "q4_0", "q4_1")
BLOCK = 32
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def ggml_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def qtype_of(ggml_quant_type) -> str | None:
    """'q8_0' for gguf.GGMLQuantizationType.Q8_0 etc.; None for types kept as floats or not supported."""
    name = ggml_quant_type.name.lower()
    return name if name in QTYPES else None


def _fp16_at(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 stored at byte ``offset`` of every block: (N, nb, bytes) -> (N, nb) float32."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


def block_scales(raw: Tensor, qtype: str) -> list[Tensor]:
    """The fp16 numbers of every block (d, and m for Q4_1) as float32 (N, nb): where a NaN or Inf would hide."""
    blocks = raw.view(raw.shape[0], -1, BLOCK_BYTES[qtype])
    return [_fp16_at(blocks, 0)] + ([_fp16_at(blocks, 2)] if qtype == "q4_1" else [])


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


def dequantize_blocks(raw: Tensor, qtype: str) -> Tensor:
    """Raw GGUF bytes (N, nb * block_bytes) -> weights (N, nb * 32) float32."""
    p = unpack_blocks(raw, qtype)
    N, nb = p["d"].shape
    q = p["codes"].view(N, nb, BLOCK).float()
    if qtype == "q8_0":
        w = p["d"][..., None] * q
    elif qtype == "q4_0":
        w = p["d"][..., None] * (q - 8)
    else:
        w = p["d"][..., None] * q + p["m"][..., None]
    return w.view(N, -1)


def quantize_blocks(w: Tensor, qtype: str) -> Tensor:
    """Float weights (N, K), K a multiple of 32 -> raw GGUF bytes, with the gguf package's (llama.cpp's) encoder."""
    from gguf.quants import quantize

    if w.shape[1] % BLOCK:
        raise ValueError(f"GGUF {qtype.upper()} needs rows of a multiple of 32 weights, got {w.shape[1]}")
    return torch.from_numpy(np.ascontiguousarray(quantize(w.float().cpu().numpy(), ggml_type(qtype))))


def int4_planes(raw: Tensor, qtype: str) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The block weights re-expressed as int4 planes (codes 0..15, scale s, zero z), w = sum of (q - 8) * s + z,
    the convention of PyTorch's int4 matmul kernels (group size 32). The codes are the file's own codes:

        Q4_0:  d * (q - 8)            -> one plane: s = d, z = 0
        Q4_1:  d * q + m              -> one plane: s = d, z = m + 8 d
        Q8_0:  d * q, q = 16 hi + lo  -> two planes: hi + 8 with s = 16 d, z = 0; lo with s = d, z = 8 d

    (lo = q & 15 in 0..15 and hi = q >> 4 in -8..7, an exact split of every int8.) So Q8_0 also runs on the int4
    kernel: two passes over half a byte per weight each read exactly the bytes of the int8 codes.
    """
    p = unpack_blocks(raw, qtype)
    d, codes = p["d"], p["codes"]
    if qtype == "q4_0":
        return [(codes.int(), d, torch.zeros_like(d))]
    if qtype == "q4_1":
        return [(codes.int(), d, p["m"] + 8 * d)]
    q = codes.int()
    hi, lo = q >> 4, q & 15  # arithmetic shift: hi in -8..7
    return [(hi + 8, 16 * d, torch.zeros_like(d)), (lo, d, 8 * d)]
