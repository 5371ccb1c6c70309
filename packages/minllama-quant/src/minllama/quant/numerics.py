"""The number formats, as pure functions on tensors: weight (out, in) float -> codes + scales -> weight again.

Every scheme stores a weight matrix row by row (one row per output channel), so that any row can be dequantized
alone (that is how a quantized embedding table looks tokens up). Each ``quantize_*`` returns a dict of tensors
whose first dimension is the output row; the matching ``dequantize_*`` turns it back into floats.

    int8   per output channel, symmetric:   w ~ s[n] * q,              q in -127..127        error <= s/2
    int4   per group of g inputs, asymmetric: w ~ s[n,j] * q + m[n,j],   q in 0..15            error <= s/2
    nf4    per block of 64, absmax scaled:  w ~ a[n,j] * NF4[q],        16 normal quantiles   error <= a * gap/2
    fp8    per output channel, e4m3:        w ~ s[n] * fp8(w / s)      3 mantissa bits       error <= |w|/16
    GGUF   Q8_0 / Q4_0 / Q4_1 blocks of 32, kept as the file's bytes (see ``gguf_blocks.py``)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------- helpers


def pad_columns(w: Tensor, multiple: int) -> Tensor:
    """Zero-pad the input dimension of ``w`` (N, K) up to a multiple of ``multiple`` (a last partial group)."""
    extra = -w.shape[1] % multiple
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def pack_nibbles(codes: Tensor) -> Tensor:
    """(N, K) codes in 0..15 -> (N, K/2) bytes: column 2i in the low nibble, column 2i+1 in the high nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor, dtype: torch.dtype = torch.uint8) -> Tensor:
    """The inverse of ``pack_nibbles``: (N, K/2) bytes -> (N, K) codes in ``dtype``, written straight into it (a
    dequantization asks for float32: no byte copy of the codes first)."""
    codes = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype, device=packed.device)
    codes[..., 0::2], codes[..., 1::2] = packed & 15, packed >> 4
    return codes


ROWS_CHUNK = 1 << 20  # weights quantized at once by ``by_rows``: float32 temporaries of 4 MB


def by_rows(quantize_rows: Callable[..., dict[str, Tensor]], w: Tensor, *args) -> dict[str, Tensor]:
    """``quantize_rows(w, *args)``, computed a block of whole rows (about ``ROWS_CHUNK`` weights) at a time into
    outputs allocated once. For a format whose rows are quantized independently of one another the numbers are the
    same, but the float temporaries (a float32 copy, ``|w|``, ``w / s``, the rounded codes) are a few MB instead of
    several copies of the matrix: 113 MB each for SmolLM2's fp32 embedding, which is also its head."""
    step = max(1, ROWS_CHUNK // max(1, w.shape[1]))
    if w.shape[0] <= step:
        return quantize_rows(w, *args)
    first = quantize_rows(w[:step], *args)
    out = {k: torch.empty((w.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device) for k, t in first.items()}
    for k, t in first.items():
        out[k][:step] = t
    for i in range(step, w.shape[0], step):
        for k, t in quantize_rows(w[i:i + step], *args).items():
            out[k][i:i + step] = t
    return out


def _round_fp16(x: Tensor, direction: float) -> Tensor:
    """Round to float16 towards ``direction`` (+inf or -inf), so that the stored value brackets the true one."""
    h = x.half()
    wrong = (h.float() > x) if direction < 0 else (h.float() < x)
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


# ------------------------------------------------------------------------------------------------------ int8
def quantize_int8(w: Tensor) -> dict[str, Tensor]:
    """Symmetric int8 per output channel: s = max|w_row| / 127, q = round(w / s). Error <= s/2 per weight."""
    return by_rows(_quantize_int8_rows, w)


def _quantize_int8_rows(w: Tensor) -> dict[str, Tensor]:
    w = w.float()
    lo, hi = torch.aminmax(w, dim=1)  # max|w_row| = max(-min, max), without a |w| copy of the block
    scales = torch.maximum(-lo, hi).clamp(min=1e-12) / 127  # (N,)
    q = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # (N, K): one float temporary
    return {"qweight": q, "scales": scales}


def dequantize_int8(qweight: Tensor, scales: Tensor) -> Tensor:
    # in place: one float32 matrix, not two (a prefill dequantizes every matrix, and the second was the largest
    # temporary of its step); every int8 is exact in float32, so the numbers are those of q.float() * s
    return qweight.float().mul_(scales[:, None].float())


# ------------------------------------------------------------------------------------------------------ int4
def quantize_int4(w: Tensor, group_size: int) -> dict[str, Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: the group's range [min, max] is cut into 15 steps.

    w ~ s * q + m with q in 0..15, s = (max - min) / 15, m = min. s and m are stored as float16 rounded *outwards*
    (m down, s up) so that the stored grid still covers the whole range: the error stays <= s/2 for every weight.
    A last partial group is padded with zeros. Returns qweight (N, Kp/2) uint8, scales and mins (N, Kp/g) fp16.
    """
    return by_rows(_quantize_int4_rows, w, group_size)


def _quantize_int4_rows(w: Tensor, group_size: int) -> dict[str, Tensor]:
    wp = pad_columns(w.float(), group_size)
    N, Kp = wp.shape
    groups = wp.view(N, Kp // group_size, group_size)  # (N, G, g)
    lo, hi = torch.aminmax(groups, dim=-1)  # (N, G)
    mins = _round_fp16(lo, -math.inf)
    scales = _round_fp16(((hi - mins.float()) / 15).clamp(min=2**-24), math.inf)
    # in place after the first subtraction: one float temporary of the block, not four
    q = (groups - mins.float()[..., None]).div_(scales.float()[..., None]).round_().clamp_(0, 15)
    return {"qweight": pack_nibbles(q.view(N, Kp)), "scales": scales, "mins": mins}


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor, in_features: int) -> Tensor:
    N, G = scales.shape
    w = unpack_nibbles(qweight, torch.float32).view(N, G, -1)  # (N, G, g), the codes
    w.mul_(scales.float()[..., None]).add_(mins.float()[..., None])  # in place: one float32 matrix, not three
    return w.view(N, -1)[:, :in_features]


# ------------------------------------------------------------------------------------------------------- NF4
def nf4_levels() -> Tensor:
    """The 16 NF4 levels of QLoRA (Dettmers et al. 2023, eq. 4): quantiles of a standard normal, rescaled to
    [-1, 1]. 8 positive and 7 negative quantiles, so that 0 is a level exactly (padding and pruned weights stay 0).
    The outermost quantile is taken at 1 - delta, delta = (1/(2*15) + 1/(2*16)) / 2, instead of at 1 (= infinity).
    """
    delta = 0.5 * (1 / 30 + 1 / 32)
    positive = torch.special.ndtri(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).float()  # (16,) from -1 to 1


NF4_LEVELS = nf4_levels()
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's choice)
DQ_BLOCK = 256  # absmax scales per second-level scale (double quantization)


def _nearest_level(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level for each value of x (levels sorted): bucketize on the midpoints."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), midpoints)


def quantize_nf4(w: Tensor, double_quant: bool = False) -> dict[str, Tensor]:
    """NF4: each block of 64 weights is divided by its absmax and mapped to the nearest NF4 level.

    With ``double_quant`` the absmax scales (one fp32 per 64 weights = 0.5 bit/weight) are themselves quantized:
    minus their mean, to int8 in blocks of 256 (0.127 bit/weight). Returns qweight (N, Kp/2) uint8 and either
    absmax (N, Kp/64) fp32 or absmax_q (N, Kp/64) int8 + absmax_scale (n_blocks,) + absmax_mean (1,).
    """
    out = by_rows(_quantize_nf4_rows, w)  # the blocks of 64 never span two rows; double quantization spans all
    if not double_quant:
        return out
    absmax = out.pop("absmax")
    N = absmax.shape[0]
    mean = absmax.mean()
    centred = pad_columns((absmax - mean).reshape(1, -1), DQ_BLOCK).view(-1, DQ_BLOCK)  # (n_blocks, 256)
    scale2 = centred.abs().amax(-1).clamp(min=1e-12) / 127  # (n_blocks,)
    q2 = torch.round(centred / scale2[:, None]).clamp(-127, 127).to(torch.int8)
    out["absmax_q"] = q2.view(-1)[: absmax.numel()].view(N, -1)
    out["absmax_scale"], out["absmax_mean"] = scale2, mean.reshape(1)
    return out


def _quantize_nf4_rows(w: Tensor) -> dict[str, Tensor]:
    wp = pad_columns(w.float(), NF4_BLOCK)
    N, Kp = wp.shape
    blocks = wp.view(N, Kp // NF4_BLOCK, NF4_BLOCK)  # (N, B, 64)
    absmax = blocks.abs().amax(-1).clamp(min=1e-12)  # (N, B)
    codes = _nearest_level(blocks / absmax[..., None], NF4_LEVELS)  # (N, B, 64)
    return {"qweight": pack_nibbles(codes.view(N, Kp)), "absmax": absmax}


def nf4_absmax(absmax_q: Tensor, absmax_scale: Tensor, absmax_mean: Tensor) -> Tensor:
    """Undo the double quantization: (N, B) int8 codes -> (N, B) fp32 absmax."""
    N, B = absmax_q.shape
    flat = pad_columns(absmax_q.reshape(1, -1).float(), DQ_BLOCK).view(-1, DQ_BLOCK)
    return (flat * absmax_scale[:, None]).view(-1)[: N * B].view(N, B) + absmax_mean


def dequantize_nf4(qweight: Tensor, absmax: Tensor, in_features: int) -> Tensor:
    N, B = absmax.shape
    codes = unpack_nibbles(qweight, torch.long).view(N, B, NF4_BLOCK)
    w = NF4_LEVELS.to(qweight.device)[codes] * absmax[..., None]
    return w.view(N, -1)[:, :in_features]


# ------------------------------------------------------------------------------------------------------- fp8
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def quantize_fp8(w: Tensor) -> dict[str, Tensor]:
    """e4m3 per output channel: s = max|w_row| / 448 puts the largest weight at the top of the fp8 range;
    w / s is rounded to the nearest e4m3 value (3 mantissa bits: relative error <= 2^-4; below 2^-6 the
    subnormals have a fixed step of 2^-9, absolute error <= 2^-10)."""
    return by_rows(_quantize_fp8_rows, w)


def _quantize_fp8_rows(w: Tensor) -> dict[str, Tensor]:
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_E4M3_MAX  # (N,)
    return {"qweight": (w / scales[:, None]).to(torch.float8_e4m3fn), "scales": scales}


def dequantize_fp8(qweight: Tensor, scales: Tensor) -> Tensor:
    return qweight.float() * scales[:, None].float()


def fp8_error_bound(w: Tensor, scales: Tensor) -> Tensor:
    """The largest error e4m3 rounding may make on each weight (see ``quantize_fp8``)."""
    return scales[:, None] * torch.maximum(w.abs() / scales[:, None] * 2**-4, torch.tensor(2.0**-10))
