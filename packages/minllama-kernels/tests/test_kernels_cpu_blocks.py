"""The C++ GEMV and decode step on weights stored in blocks of 32 (GGUF Q4_0 / Q4_1 / Q8_0, int4 with groups of
32 or 64): every layout against its dequantized matrix, multiplied in float64 (the oracle). The GGUF bytes are
decoded by core's ``gguf_file.dequantize_blocks`` (llama.cpp's layouts), int4 by the packing written out here.
Shapes are odd: rows not a multiple of the 4-row unroll, int4 columns that end inside a group (zero padding)."""
import copy

import pytest
import torch
import torch.nn as nn

from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.gguf_file import BLOCK_BYTES, dequantize_blocks, unpack_blocks
from minllama.core.model import MinimalLlama
from minllama.kernels import cpu_gemv
from minllama.kernels.cpu_decode import cpu_decode_unsupported, use_cpu_decode

from test_kernels_cpu_decode import steps

REASON = cpu_gemv.cpu_gemv_supported()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels unavailable: {REASON}")


def random_blocks(N: int, K: int, qtype: str, g: torch.Generator) -> torch.Tensor:
    """(N, K/32 * block bytes) uint8: random codes, and d (and m) random fp16 numbers of a weight's scale."""
    nb = K // 32
    d = ((torch.rand(N, nb, 1, generator=g) * 0.02 + 0.001) / (8 if qtype == "q8_0" else 1)).half()
    parts = [d.view(torch.uint8)]  # (N, nb, 2): the fp16's bytes
    if qtype == "q4_1":
        parts.append((torch.randn(N, nb, 1, generator=g) * 0.1).half().view(torch.uint8))
    n_codes = 32 if qtype == "q8_0" else 16
    parts.append(torch.randint(0, 256, (N, nb, n_codes), generator=g, dtype=torch.uint8))
    raw = torch.cat(parts, -1)
    assert raw.shape[-1] == BLOCK_BYTES[qtype]
    return raw.reshape(N, -1)


def gguf_parts(raw: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, their scale, an offset), each (N, K) float64, with w = codes * scale + offset: core's unpacking of
    llama.cpp's layouts (Q4_0: w = d (q - 8), Q4_1: d q + m, Q8_0: d q)."""
    p = unpack_blocks(raw, qtype)
    d = p["d"].double().repeat_interleave(32, 1)
    offset = p["m"].double().repeat_interleave(32, 1) if qtype == "q4_1" else -8 * d if qtype == "q4_0" else 0 * d
    return p["codes"].double(), d, offset


def random_int4(N: int, K: int, group: int, g: torch.Generator):
    """(qweight (N, Kp/2) uint8, scales, mins (N, Kp/group) fp16, (codes, scale, offset) (N, K) float64): code 2j
    in the low nibble of byte j, 2j+1 in the high one; w = code * scale + min per group; Kp = K rounded up to whole
    groups."""
    Kp = -(-K // group) * group
    codes = torch.randint(0, 16, (N, Kp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, Kp // group, generator=g) * 0.02 + 0.001).half()
    mins = (torch.randn(N, Kp // group, generator=g) * 0.1).half()
    qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)
    parts = (codes.double(), scales.double().repeat_interleave(group, 1), mins.double().repeat_interleave(group, 1))
    return qweight, scales, mins, tuple(t[:, :K] for t in parts)


@pytest.fixture(params=[False, True], ids=["fp32-dot", "integer-dot"])
def integer_dot(request):
    """Both ways the kernel multiplies blocks: codes widened to fp32, or integer dot products with x rounded to
    int8 per block (AVX512-VNNI: skipped where the CPU lacks it; set_integer_dot then keeps fp32)."""
    if request.param and not _has_vnni():
        pytest.skip("the CPU has no AVX512-VNNI: the integer path never runs here")
    ext = cpu_gemv._extension()
    before = ext.set_integer_dot(request.param)
    yield request.param
    ext.set_integer_dot(before)


def _has_vnni() -> bool:
    from minllama.core.dtypes import cpu_flags
    return "avx512_vnni" in (cpu_flags() or set())


def x_rounded_per_block(x: torch.Tensor) -> torch.Tensor:
    """x as the integer path sees it: per block of 32 columns, sx = max|x| / 127 and x ~ sx * round(x / sx)
    (computed as x * (127 / max|x|) in fp32, round half to even)."""
    K = x.shape[0]
    blocks = torch.nn.functional.pad(x, (0, -K % 32)).view(-1, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv).double() * (amax / 127).double()).flatten()[:K]


def check(y: torch.Tensor, parts, x: torch.Tensor, integer: bool) -> None:
    """y against W x, W = codes * scale + offset. In fp32: to a few ulps of |W| . |x|. With integer dots: to a few
    ulps of what it computes exactly, (codes * scale) x~ + offset x (x~ = x rounded per block; the offsets meet
    the exact sums of x), and within the bound rounding x allows, |codes * scale| |x - x~|."""
    codes, scale, offset = parts
    w, xd = codes * scale + offset, x.double()
    assert y.shape == (w.shape[0],) and y.dtype == torch.float32
    ulps = 1e-5 * (w.abs() @ xd.abs()).max().item()
    if not integer:
        torch.testing.assert_close(y.double(), w @ xd, rtol=0, atol=ulps)
        return
    xr = x_rounded_per_block(x)
    torch.testing.assert_close(y.double(), (codes * scale) @ xr + offset @ xd, rtol=0, atol=ulps)
    bound = (codes * scale).abs() @ (xd - xr).abs() + ulps
    assert ((y.double() - w @ xd).abs() <= bound).all()
    assert (xd - xr).abs().max() > 0, "this x is on the int8 grid already: the test could not tell the paths apart"


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("N,K", [(1, 32), (7, 96), (67, 576), (5, 1056)])  # 33 blocks: a chunk of 16 + 1 left
def test_gguf_blocks_match_their_dequantized_matrix(qtype, N, K, integer_dot):
    g = torch.Generator().manual_seed(N * K)
    raw, x = random_blocks(N, K, qtype, g), torch.randn(K, generator=g)
    parts = gguf_parts(raw, qtype)
    torch.testing.assert_close(parts[0] * parts[1] + parts[2], dequantize_blocks(raw, qtype).double())
    check(cpu_gemv._extension().gemv(x, qtype, [raw]), parts, x, integer_dot)


@pytest.mark.parametrize("group", [32, 64, 256])
@pytest.mark.parametrize("N,K", [(1, 32), (5, 40), (13, 100), (67, 576), (3, 1000)])
def test_int4_groups_match_their_dequantized_matrix(group, N, K, integer_dot):
    g = torch.Generator().manual_seed(N * K + group)
    qweight, scales, mins, parts = random_int4(N, K, group, g)
    x = torch.randn(K, generator=g)
    check(cpu_gemv._extension().gemv(x, "int4", [qweight, scales, mins]), parts, x, integer_dot)


class BlockLinear(nn.Module):
    """A linear layer quantized to one of the block layouts, as minllama-quant stores it (``scheme`` and buffers:
    ``Int4Linear``, ``GGUFLinear``; this package cannot import quant). int4 is quantized by plain rounding here,
    GGUF layers get random blocks of the weights' scale (the layout is under test, not the rounding).

    forward is the oracle's arithmetic in float64: W x, or with ``round_x`` what the integer path computes,
    (codes * scale) x~ + offset x (see ``check``)."""

    round_x = False

    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        self.scheme = scheme
        w = linear.weight.detach().float()
        N, K = w.shape
        self.in_features = K
        if scheme == "int4":  # groups of 32, asymmetric
            Kp = -(-K // 32) * 32
            groups = torch.nn.functional.pad(w, (0, Kp - K)).view(N, -1, 32)
            lo, hi = groups.amin(-1), groups.amax(-1)
            scales, mins = ((hi - lo) / 15).clamp(min=1e-6).half(), lo.half()
            codes = ((groups - mins.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
            codes = codes.to(torch.uint8).view(N, Kp)
            self.register_buffer("qweight", codes[:, 0::2] | (codes[:, 1::2] << 4))
            self.register_buffer("scales", scales)
            self.register_buffer("mins", mins)
        else:
            self.register_buffer("blocks", random_blocks(N, K, scheme, torch.Generator().manual_seed(N * K)))

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.scheme != "int4":
            return gguf_parts(self.blocks, self.scheme)
        codes = torch.stack([self.qweight & 15, self.qweight >> 4], -1).flatten(1).double()
        group = codes.shape[1] // self.scales.shape[1]
        scale, offset = (t.double().repeat_interleave(group, 1) for t in (self.scales, self.mins))
        return tuple(t[:, :self.in_features] for t in (codes, scale, offset))

    def dequantize(self) -> torch.Tensor:
        codes, scale, offset = self.parts()
        return (codes * scale + offset).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, offset = self.parts()
        rows = x.reshape(-1, x.shape[-1])
        xr = torch.stack([x_rounded_per_block(r) for r in rows]) if self.round_x else rows.double()
        y = xr @ (codes * scale).T + rows.double() @ offset.T
        return y.to(x.dtype).view(*x.shape[:-1], -1)


def block_model(scheme: str, round_x: bool, **config) -> tuple[MinimalLlama, MinimalLlama]:
    """(model with every linear in ``scheme``, an independent copy: the oracle, its layers computing in float64,
    on x rounded per block as the integer path rounds it if ``round_x``)."""
    torch.manual_seed(0)
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa", **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent, child = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, child, BlockLinear(module, scheme))
            getattr(parent, child).round_x = round_x
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("scheme,config", [("int4", dict(dim=40, hidden_dim=100)),  # ragged: padded groups
                                           ("q4_1", {}), ("q4_0", {}), ("q8_0", {})])
def test_block_decode_steps_equal_the_model_on_its_dequantized_weights(scheme, config, integer_dot):
    quantized, oracle = block_model(scheme, round_x=False, **config)
    assert cpu_decode_unsupported(quantized) is None
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    want, _ = steps(oracle, tokens, 5)
    fast = use_cpu_decode(quantized)
    got, _ = steps(fast, tokens, 5)
    # fp32: the same arithmetic. Integer dots round x to 8 bits in every matrix product (llama.cpp does too), and
    # a number that lands on the other side of a rounding boundary changes that step and the cache after it: the
    # tight check of that path is the GEMV's (check); here, a broken layout or scale would be off by ~100%.
    tolerance = 0.1 if integer_dot else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance * want.abs().max().item())
    assert generate(fast, [[1, 2, 3]], 8) == generate(oracle, [[1, 2, 3]], 8)
