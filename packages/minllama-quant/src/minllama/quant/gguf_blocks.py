"""GGUF's Q8_0, Q4_0 and Q4_1 blocks kept as the file's bytes (llama.cpp's ggml-common.h layouts): encoded with the
gguf package, decoded by core's ``gguf_file`` (its loader dequantizes them too), re-expressed for the int4 kernels.

The block layouts (Q8_0 34 bytes, Q4_0 18, Q4_1 20 per 32 weights) are drawn in core's ``gguf_file.py``.
A GGUF tensor of shape (N, K) is simply N rows of K/32 blocks: a uint8 array (N, K/32 * block_bytes).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# The layouts are read (unpacked, dequantized) by core, whose GGUF loader needs them too: see core/gguf_file.py.
from minllama.core.gguf_file import BLOCK, BLOCK_BYTES, block_scales, dequantize_blocks, unpack_blocks  # noqa: F401

from .numerics import by_rows

QTYPES = tuple(BLOCK_BYTES)


def ggml_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def qtype_of(ggml_quant_type) -> str | None:
    """'q8_0' for gguf.GGMLQuantizationType.Q8_0 etc.; None for types kept as floats or not supported."""
    name = ggml_quant_type.name.lower()
    return name if name in QTYPES else None


def quantize_blocks(w: Tensor, qtype: str) -> Tensor:
    """Float weights (N, K), K a multiple of 32 -> raw GGUF bytes, with the gguf package's (llama.cpp's) encoder.
    A block never spans two rows, so a large matrix is encoded a few MB of rows at a time (``numerics.by_rows``)."""
    if w.shape[1] % BLOCK:
        raise ValueError(f"GGUF {qtype.upper()} needs rows of a multiple of 32 weights, got {w.shape[1]}")
    return by_rows(_quantize_block_rows, w, qtype)["blocks"]


def _quantize_block_rows(w: Tensor, qtype: str) -> dict[str, Tensor]:
    from gguf.quants import quantize

    return {"blocks": torch.from_numpy(np.ascontiguousarray(quantize(w.float().cpu().numpy(), ggml_type(qtype))))}


def int4_planes(raw: Tensor, qtype: str) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The block weights re-expressed as int4 planes (codes 0..15, scale s, zero z), w = sum of (q - 8) * s + z,
    the convention of PyTorch's int4 matmul kernels (group size 32). The codes are the file's own codes:

        Q4_0:  d * (q - 8)            -> one plane: s = d, z = 0
        Q4_1:  d * q + m              -> one plane: s = d, z = m + 8 d
        Q8_0:  d * q, q = 16 hi + lo  -> two planes: hi + 8 with s = 16 d, z = 0; lo with s = d, z = 8 d

    (lo = q & 15 in 0..15 and hi = q >> 4 in -8..7, an exact split of every int8.) So Q8_0 also runs on the int4
    kernel: two passes over half a byte per weight each read exactly the bytes of the int8 codes.
    The codes are uint8 (one byte a weight: SmolLM2's Q8_0 head as int32 planes would be 2 x 113 MB at once).
    """
    p = unpack_blocks(raw, qtype)
    d, codes = p["d"], p["codes"]
    if qtype == "q4_0":
        return [(codes, d, torch.zeros_like(d))]
    if qtype == "q4_1":
        return [(codes, d, p["m"] + 8 * d)]
    hi, lo = (codes >> 4) + 8, codes & 15  # int8 arithmetic shift: q >> 4 in -8..7
    return [(hi.view(torch.uint8), 16 * d, torch.zeros_like(d)), (lo.view(torch.uint8), d, 8 * d)]
