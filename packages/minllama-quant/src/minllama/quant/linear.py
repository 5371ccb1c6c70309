"""Quantized drop-in replacements for ``nn.Linear`` (and a tied ``nn.Embedding``).

Every ``QuantLinear`` keeps its weight as buffers in a plain, documented layout (``numerics.py``,
``gguf_blocks.py``) and offers two ways to multiply:

    fallback: y = x @ dequantize().T              any device, any batch; exact w.r.t. the stored numbers
    packed:   y = kernel(x, packed weight)        PyTorch's low-bit kernel (``kernels.py``), built lazily per device

``path`` picks one: "auto" (packed when a kernel exists and x has at most ``PACKED_MAX_ROWS`` rows, e.g. decoding),
"packed" or "fallback". The dequantized-weight protocol, for adapters (LoRA/QLoRA) that sit on top:

    module.in_features, module.out_features    the nn.Linear shape
    module.dequantize(rows=None) -> Tensor      (out, in) (or the selected rows) in the compute dtype, no grad
    module.weight                               the same as dequantize(), read-only (a property)
    module(x)                                   x @ weight.T, with the fast path when it exists
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import gguf_blocks, kernels, numerics

PACKED_MAX_ROWS = 16  # above this many rows (prefill), dequantize once and use the float GEMM


class QuantLinear(nn.Module):
    """Base class: buffers + dequantize + forward. Subclasses define the layout and the kernel."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, tensors: dict[str, Tensor], **options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.options = options
        for name, t in tensors.items():
            self.register_buffer(name, t)
        # An empty float tensor that follows model.to(dtype): the dtype the weight dequantizes to.
        first = next(iter(tensors.values()))
        self.register_buffer("_dtype_probe", torch.empty(0, device=first.device), persistent=False)
        self.path = "auto"
        self._pack = None  # the kernel's layout of the weight, for _pack_device
        self._pack_device = None

    # -- construction
    @classmethod
    def buffer_shapes(cls, in_features: int, out_features: int, **options) -> dict[str, tuple[tuple, torch.dtype]]:
        raise NotImplementedError

    @classmethod
    def quantize_weight(cls, w: Tensor, **options) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def from_weight(cls, w: Tensor, **options) -> "QuantLinear":
        """Quantize a float weight (out, in)."""
        with torch.no_grad():
            return cls(w.shape[1], w.shape[0], cls.quantize_weight(w.detach(), **options), **options)

    @classmethod
    def empty(cls, in_features: int, out_features: int, device="meta", **options) -> "QuantLinear":
        """Uninitialised buffers of the right shapes (to be filled by load_state_dict(assign=True))."""
        shapes = cls.buffer_shapes(in_features, out_features, **options)
        tensors = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in shapes.items()}
        return cls(in_features, out_features, tensors, **options)

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this module: class + options."""
        return {"class": type(self).__name__, **self.options}

    # -- the dequantized-weight protocol
    def _dequantize(self, rows: Tensor | None) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def dequantize(self, rows: Tensor | None = None) -> Tensor:
        """The weight (out, in) as floats, or only the output rows ``rows`` (an index tensor)."""
        return self._dequantize(rows).to(self._dtype_probe.dtype)

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    @staticmethod
    def _take(t: Tensor, rows: Tensor | None) -> Tensor:
        return t if rows is None else t[rows]

    # -- matmul
    def _make_pack(self, device: torch.device):
        """The weight in the fast kernel's layout for ``device``, or None when no kernel exists there."""
        return None

    def _packed_mm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, device: torch.device | None = None) -> bool:
        """Build the kernel layout now (instead of at the first call); True if a fast kernel exists."""
        device = torch.device(device) if device is not None else self._dtype_probe.device
        if self._pack_device != device:
            self._pack, self._pack_device = self._make_pack(device), device
        return self._pack is not None

    def use_packed(self, x: Tensor) -> bool:
        if self.path == "fallback" or x.device.type == "meta":
            return False
        if x.requires_grad and torch.is_grad_enabled():  # the kernels have no backward: adapters training on top
            return False
        ok = self.prepare(x.device)
        if self.path == "packed":
            if not ok:
                raise RuntimeError(f"{type(self).__name__} has no fast kernel on {x.device}: use path='auto'")
            return True
        rows = x.numel() // x.shape[-1]
        return ok and (x.device.type != "cpu" or rows <= PACKED_MAX_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_packed(x):
            y = self._packed_mm(x.reshape(-1, x.shape[-1]))  # (M, N) float32
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize().to(x.dtype))

    def stored_bytes(self) -> int:
        return sum(b.nbytes for name, b in self.named_buffers() if name != "_dtype_probe")

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"in_features={self.in_features}, out_features={self.out_features}{opts}, path={self.path}"


class Int8Linear(QuantLinear):
    """int8 per output channel (``numerics.quantize_int8``); fast path ``_weight_int8pack_mm``."""

    scheme = "int8"

    @classmethod
    def buffer_shapes(cls, in_features, out_features):
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float32)}

    @classmethod
    def quantize_weight(cls, w):
        return numerics.quantize_int8(w)

    def _dequantize(self, rows):
        return numerics.dequantize_int8(self._take(self.qweight, rows), self._take(self.scales, rows))

    def _make_pack(self, device):  # the kernel's own scales: ones (see kernels.int8_mm)
        # PyTorch's CPU kernel reads K in blocks of 16 and crashes the process (segfault) otherwise: measured for
        # K = 40 and 100 with torch 2.15; such layers take the fallback path
        if not (kernels.has_int8_kernel(device) and self.qweight.device == device
                and (device.type != "cpu" or self.in_features % 16 == 0)):
            return None
        return torch.ones(self.out_features, dtype=torch.bfloat16, device=device)

    def _packed_mm(self, x):
        return kernels.int8_mm(x, self.qweight, self.scales, self._pack)


class Int4Linear(QuantLinear):
    """int4 asymmetric, one (scale, min) per ``group_size`` inputs; fast path the int4 weight-only kernel."""

    scheme = "int4"

    @classmethod
    def buffer_shapes(cls, in_features, out_features, group_size):
        groups = -(-in_features // group_size)
        return {"qweight": ((out_features, groups * group_size // 2), torch.uint8),
                "scales": ((out_features, groups), torch.float16), "mins": ((out_features, groups), torch.float16)}

    @classmethod
    def quantize_weight(cls, w, group_size):
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256 (the kernel's sizes), got {group_size}")
        return numerics.quantize_int4(w, group_size)

    def _dequantize(self, rows):
        return numerics.dequantize_int4(self._take(self.qweight, rows), self._take(self.scales, rows),
                                        self._take(self.mins, rows), self.in_features)

    def _make_pack(self, device):
        if not kernels.int4_kernel_takes(device, self.out_features):
            return None
        s = self.scales.float()
        # ours: q * s + m; the kernel's: (q - 8) * s + z, so z = m + 8 s
        return kernels.Int4Pack(numerics.unpack_nibbles(self.qweight), s, self.mins.float() + 8 * s,
                                self.options["group_size"], device)

    def _packed_mm(self, x):
        padded = self.qweight.shape[1] * 2
        if padded != x.shape[-1]:  # the last group was padded with zeros: pad x too (the zeros add nothing)
            x = F.pad(x, (0, padded - x.shape[-1]))
        return self._pack.mm(x)


class NF4Linear(QuantLinear):
    """NF4 (QLoRA), blocks of 64, optional double quantization. No PyTorch kernel: always dequantize."""

    scheme = "nf4"

    @classmethod
    def buffer_shapes(cls, in_features, out_features, double_quant=False):
        blocks = -(-in_features // numerics.NF4_BLOCK)
        shapes = {"qweight": ((out_features, blocks * numerics.NF4_BLOCK // 2), torch.uint8)}
        if not double_quant:
            shapes["absmax"] = ((out_features, blocks), torch.float32)
            return shapes
        n_dq = -(-out_features * blocks // numerics.DQ_BLOCK)
        shapes.update(absmax_q=((out_features, blocks), torch.int8), absmax_scale=((n_dq,), torch.float32),
                      absmax_mean=((1,), torch.float32))
        return shapes

    @classmethod
    def quantize_weight(cls, w, double_quant=False):
        return numerics.quantize_nf4(w, double_quant)

    def absmax_values(self) -> Tensor:
        if self.options.get("double_quant"):
            return numerics.nf4_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def _dequantize(self, rows):
        absmax = self._take(self.absmax_values(), rows)
        return numerics.dequantize_nf4(self._take(self.qweight, rows), absmax, self.in_features)


class FP8Linear(QuantLinear):
    """e4m3 weights, one fp32 scale per output channel.

    fallback: x @ (fp8 weight * scale).T (weight-only). packed: activations quantized per row to e4m3 too, then
    ``torch._scaled_mm`` on GPUs with fp8 tensor cores, ``kernels.scaled_mm_emulated`` (the same arithmetic)
    elsewhere when asked with path="packed".
    """

    scheme = "fp8"

    @classmethod
    def buffer_shapes(cls, in_features, out_features):
        return {"qweight": ((out_features, in_features), torch.float8_e4m3fn),
                "scales": ((out_features,), torch.float32)}

    @classmethod
    def quantize_weight(cls, w):
        return numerics.quantize_fp8(w)

    def _dequantize(self, rows):
        return numerics.dequantize_fp8(self._take(self.qweight, rows), self._take(self.scales, rows))

    def _make_pack(self, device):
        if kernels.has_fp8_kernel(device):
            return "kernel"
        return "emulated" if self.path == "packed" else None

    def _packed_mm(self, x):
        a, scale_a = kernels.quantize_rows_fp8(x)
        if self._pack == "kernel":
            return kernels.scaled_mm(a, scale_a, self.qweight, self.scales)
        return kernels.scaled_mm_emulated(a, scale_a, self.qweight, self.scales)

    def prepare(self, device=None):
        self._pack_device = None  # the choice depends on self.path: always re-decide (it is cheap)
        return super().prepare(device)


class GGUFLinear(QuantLinear):
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor kept as the file's bytes; fast path the int4 kernel (``int4_planes``)."""

    @property
    def scheme(self):
        return self.options["qtype"]

    @classmethod
    def buffer_shapes(cls, in_features, out_features, qtype):
        if in_features % gguf_blocks.BLOCK:
            raise ValueError(f"GGUF {qtype} rows hold a multiple of 32 weights, not {in_features}")
        n_bytes = in_features // gguf_blocks.BLOCK * gguf_blocks.BLOCK_BYTES[qtype]
        return {"blocks": ((out_features, n_bytes), torch.uint8)}

    @classmethod
    def quantize_weight(cls, w, qtype):
        return {"blocks": gguf_blocks.quantize_blocks(w, qtype)}

    def _dequantize(self, rows):
        return gguf_blocks.dequantize_blocks(self._take(self.blocks, rows), self.options["qtype"])

    def _make_pack(self, device):
        if not kernels.int4_kernel_takes(device, self.out_features):
            return None
        planes = gguf_blocks.int4_planes(self.blocks, self.options["qtype"])
        return [kernels.Int4Pack(q, s, z, gguf_blocks.BLOCK, device) for q, s, z in planes]

    def _packed_mm(self, x):
        y = self._pack[0].mm(x)
        for plane in self._pack[1:]:
            y = y + plane.mm(x)
        return y


class QuantEmbedding(nn.Module):
    """The token embedding of a tied model, looked up in the quantized output head: row t of the head's weight
    is the embedding of token t, so only the looked-up rows are dequantized. The head is held by reference (not
    a submodule): the checkpoint stores its buffers once, under ``output``."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "head", head)  # bypass nn.Module registration
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.head.dequantize(tokens.reshape(-1))  # (B*T, dim)
        return rows.view(*tokens.shape, self.embedding_dim)

    @property
    def weight(self) -> Tensor:
        """The full table, dequantized (core reads its dtype and device to size the KV cache)."""
        return self.head.dequantize()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to the quantized output head"


LINEAR_CLASSES = {c.__name__: c for c in (Int8Linear, Int4Linear, NF4Linear, FP8Linear, GGUFLinear)}
