"""Fast paths: PyTorch's own low-bit matmul kernels, wrapped with their exact conventions.

    int8:  torch.ops.aten._weight_int8pack_mm(x (M, K), q int8 (N, K), scales (N,)) -> x @ (q * scales).T
    int4:  CPU  _convert_weight_to_int4pack_for_cpu(codes int32 (N, K), inner_k_tiles) -> packed
                _weight_int4pack_mm_for_cpu(x (M, K), packed, group, sz (K/group, N, 2))
           CUDA _convert_weight_to_int4pack(bytes uint8 (N, K/2), inner_k_tiles) -> packed (tensor-core layout)
                _weight_int4pack_mm(x bf16 (M, K), packed, group, sz bf16 (K/group, N, 2))
           both dequantize w[n, k] = (q - 8) * sz[k // group, n, 0] + sz[k // group, n, 1]
    fp8:   torch._scaled_mm(x fp8 (M, K), w fp8 (K, N) column-major, scale_a (M, 1), scale_b (1, N)) on GPUs with
           fp8 tensor cores (compute capability >= 8.9); ``scaled_mm_emulated`` computes the same thing anywhere.

On this x86 CPU (AVX2) the int8 and int4 kernels are vectorized for bfloat16 activations only (fp32 activations
take a scalar loop ~20x slower), so the fast path rounds x to bf16, accumulates in fp32 inside the kernel and
returns fp32. It is a matrix-*vector* kernel at heart: for many rows (prefill) dequantizing once and calling the
fp32 GEMM is faster, which is what ``PACKED_MAX_ROWS`` decides (see ``linear.QuantLinear.forward``).
"""
from __future__ import annotations

import torch
from torch import Tensor

aten = torch.ops.aten
INNER_K_TILES = 2  # the int4 kernels' K tiling; 2 only needs K % 32 == 0 on CUDA (SmolLM2 has K = 576)


def has_int8_kernel(device: torch.device) -> bool:
    return hasattr(aten, "_weight_int8pack_mm") and device.type in ("cpu", "cuda")


def has_int4_kernel(device: torch.device) -> bool:
    if device.type == "cpu":
        return hasattr(aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and hasattr(aten, "_weight_int4pack_mm")


def int4_kernel_takes(device: torch.device, out_features: int) -> bool:
    """PyTorch's CPU int4 packing refuses N % 16 != 0 (RuntimeError "expect N to be dividable by 16", torch 2.15):
    such layers (e.g. a tiny model's 20-row wk) take the fallback path instead of failing at their first call."""
    return has_int4_kernel(device) and (device.type != "cpu" or out_features % 16 == 0)


def has_fp8_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def int8_mm(x: Tensor, qweight: Tensor, scales: Tensor, ones: Tensor) -> Tensor:
    """x (M, K) @ (qweight * scales).T via the int8 weight-only kernel. The kernel gets bf16 scales of one
    (``ones``, (N,) bf16) and our fp32 scales are applied to its output, so they stay exact.

    ``ones`` is made once (``Int8Linear`` keeps it), not here: inside ``torch.compile`` a ``torch.ones`` in the
    traced step becomes a computed node, and Inductor's lowering of the kernel refuses a computed scale
    (``LoweringException: AssertionError: <class 'torch._inductor.ir.Pointwise'>``)."""
    y = aten._weight_int8pack_mm(x.to(torch.bfloat16), qweight, ones)  # (M, N) bf16
    return y.float() * scales


class Int4Pack:
    """An int4 weight in the kernel's layout for one device: (codes, scales, zeros) -> packed + sz."""

    def __init__(self, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, device: torch.device):
        # codes (N, K) int 0..15 (any integer dtype); scales, zeros (N, K/group): w = (q - 8) * scale + zero
        if device.type == "cpu":
            # the CPU packing takes int32 codes (4 bytes a weight: 113 MB for SmolLM2's head) and packs tiles of 64
            # rows on their own, so it goes ~1M weights of whole tiles at a time (the same bytes as in one piece,
            # tested; slabs that are not whole tiles are not)
            rows = max(64, (1 << 20) // codes.shape[1] // 64 * 64)
            self.packed = torch.cat([aten._convert_weight_to_int4pack_for_cpu(
                codes[i:i + rows].to(torch.int32).contiguous(), INNER_K_TILES) for i in range(0, codes.shape[0], rows)])
        else:  # CUDA wants two codes per byte, the even column in the high nibble
            codes = codes.to(device=device, dtype=torch.int32)
            as_bytes = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.packed = aten._convert_weight_to_int4pack(as_bytes.contiguous(), INNER_K_TILES)
        sz = torch.stack([scales.float(), zeros.float()], dim=-1).transpose(0, 1)  # (K/group, N, 2)
        self.sz = sz.to(device=device, dtype=torch.bfloat16).contiguous()
        self.group_size, self.device = group_size, device

    def mm(self, x: Tensor) -> Tensor:
        """x (M, K) -> (M, N) float32."""
        xb = x.to(torch.bfloat16)
        if self.device.type == "cpu":
            y = aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.sz)
        else:
            y = aten._weight_int4pack_mm(xb, self.packed, self.group_size, self.sz)
        return y.float()

    def nbytes(self) -> int:
        return self.packed.nbytes + self.sz.nbytes


def int4_reference(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """What ``Int4Pack.mm`` computes, in plain PyTorch: bf16 x, bf16 scales and zeros, fp32 accumulation."""
    s = scales.to(torch.bfloat16).float().repeat_interleave(group_size, dim=1)
    z = zeros.to(torch.bfloat16).float().repeat_interleave(group_size, dim=1)
    w = (codes.float() - 8) * s + z  # (N, K)
    return x.to(torch.bfloat16).float() @ w.T


# ---------------------------------------------------------------------------------------------------- fp8
def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row (per-token) e4m3 quantization of activations: x (M, K) -> (fp8 (M, K), scale (M, 1))."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def scaled_mm_emulated(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> Tensor:
    """torch._scaled_mm's arithmetic without fp8 hardware: every product of two e4m3 numbers is exact in fp32,
    the sum is accumulated in fp32, then scaled. a (M, K) fp8, b (N, K) fp8, scale_a (M, 1), scale_b (N,)."""
    return (a.float() @ b.float().T) * scale_a * scale_b


def scaled_mm(a: Tensor, scale_a: Tensor, b: Tensor, scale_b: Tensor) -> Tensor:
    """The fp8 tensor-core matmul (row-wise scales need a bf16 output)."""
    y = torch._scaled_mm(a, b.T, scale_a=scale_a.float(), scale_b=scale_b.float()[None, :],
                         out_dtype=torch.bfloat16)
    return y.float()
