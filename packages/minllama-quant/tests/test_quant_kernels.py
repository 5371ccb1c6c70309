"""The packed fast paths (PyTorch's low-bit kernels) agree with the dequantize-then-matmul fallback."""
import pytest
import torch

from minllama.quant import FP8Linear, GGUFLinear, Int4Linear, Int8Linear, kernels, quantize, set_path
from quant_helpers import ALL_SCHEMES, heavy_tailed_weight, tiny_model

aten = torch.ops.aten

CPU = torch.device("cpu")
W = heavy_tailed_weight(64, 192)
X = torch.randn(3, 192)


def both_paths(module, x):
    module.path = "packed"
    packed = module(x)
    module.path = "fallback"
    return packed, module(x)


def bf16_fallback(module, x):
    """The fallback computed from bf16-rounded activations: what the kernels see."""
    module.path = "fallback"
    return module(x.bfloat16().float())


@pytest.mark.skipif(not kernels.has_int8_kernel(CPU), reason="no int8 kernel in this torch")
def test_int8_packed_equals_fallback():
    m = Int8Linear.from_weight(W)
    packed, _ = both_paths(m, X)
    # the kernel rounds x and its (unscaled) output to bf16: relative 2^-8 of the output's magnitude
    ref = bf16_fallback(m, X)
    torch.testing.assert_close(packed, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


@pytest.mark.skipif(not kernels.has_int8_kernel(CPU), reason="no int8 kernel in this torch")
def test_int8_with_a_width_the_cpu_kernel_cannot_read_takes_the_fallback():
    # PyTorch's CPU int8 kernel crashed the process (segfault) for K = 40: the layer must not call it
    m = Int8Linear.from_weight(torch.randn(24, 40))
    x = torch.randn(3, 40)
    assert not m.prepare(CPU)
    torch.testing.assert_close(m(x), x @ m.dequantize().T)


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("scheme", ["int4", "q4_1"])
def test_4bit_with_a_row_count_the_cpu_kernel_cannot_pack_takes_the_fallback(scheme):
    # PyTorch's CPU int4 packing raises "expect N to be dividable by 16" (N = 20 here): the first call must not
    from minllama.quant.model import scheme_options
    cls, options = scheme_options(scheme, **({"group_size": 32} if scheme == "int4" else {}))
    m = cls.from_weight(torch.randn(20, 64), **options)
    x = torch.randn(3, 64)
    assert not m.prepare(CPU)
    torch.testing.assert_close(m(x), x @ m.dequantize().T)


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
def test_int4_pack_built_a_slab_of_rows_at_a_time_equals_one_piece():
    codes = torch.randint(0, 16, (4096 + 48, 576), dtype=torch.uint8)  # 3 slabs of 1792 rows, the last partial
    s, z = torch.rand(codes.shape[0], 18) + 0.1, torch.randn(codes.shape[0], 18)
    pack = kernels.Int4Pack(codes, s, z, 32, CPU)
    assert torch.equal(pack.packed, aten._convert_weight_to_int4pack_for_cpu(codes.int(), kernels.INNER_K_TILES))


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_equals_its_reference(group):
    """The kernel's convention: w = (q - 8) * s + z with bf16 x, s and z."""
    codes = torch.randint(0, 16, (64, 256), dtype=torch.int32)
    s, z = torch.rand(64, 256 // group) + 0.1, torch.randn(64, 256 // group)
    x = torch.randn(5, 256)
    got = kernels.Int4Pack(codes, s, z, group, CPU).mm(x)
    want = kernels.int4_reference(x, codes, s, z, group)
    # it also rounds its output (and, internally, dequantized weights) to bf16: 2^-7 of the output's scale
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    assert (got - want).abs().mean() < 2**-9 * want.abs().mean()  # on average far closer: no systematic bias


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_packed_equals_fallback(group):
    m = Int4Linear.from_weight(W, group_size=group)  # 192 = 1.5 x 128: the padded last group too
    packed, fallback = both_paths(m, X)
    # bf16 x, scales and zeros: relative ~2^-8 of the weights' contribution
    torch.testing.assert_close(packed, fallback, rtol=0.02, atol=0.02 * fallback.abs().max().item())


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_gguf_packed_equals_fallback(qtype):
    m = GGUFLinear.from_weight(W, qtype=qtype)
    packed, fallback = both_paths(m, X)
    torch.testing.assert_close(packed, fallback, rtol=0.02, atol=0.02 * fallback.abs().max().item())


def test_fp8_emulation_is_scaled_mm_arithmetic():
    """Emulated _scaled_mm = per-row e4m3 activations times e4m3 weights, fp32 sums, then both scales."""
    m = FP8Linear.from_weight(W)
    a, scale_a = kernels.quantize_rows_fp8(X)
    by_hand = torch.zeros(3, 64)
    for i in range(3):
        for n in range(64):
            by_hand[i, n] = (a[i].double() * m.qweight[n].double()).sum() * scale_a[i].double() * m.scales[n]
    packed, fallback = both_paths(m, X)
    torch.testing.assert_close(packed, by_hand, rtol=1e-5, atol=1e-6)
    # and fp8 activations cost at most ~2^-4 relative on top of the weight-only fallback
    torch.testing.assert_close(packed, fallback, rtol=0.1, atol=0.1 * fallback.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_kernels_equal_fallback():
    dev = torch.device("cuda")
    x = X.to(dev)
    for m in (Int8Linear.from_weight(W), Int4Linear.from_weight(W, group_size=64),
              GGUFLinear.from_weight(W, qtype="q4_1"), GGUFLinear.from_weight(W, qtype="q8_0"),
              FP8Linear.from_weight(W)):
        m = m.to(dev)
        assert m.prepare(dev), f"{type(m).__name__} has no GPU kernel"
        packed, fallback = both_paths(m, x)
        tol = 0.1 if isinstance(m, FP8Linear) else 0.02
        torch.testing.assert_close(packed, fallback, rtol=tol, atol=tol * fallback.abs().max().item())


@pytest.mark.parametrize("scheme,opts", ALL_SCHEMES)
def test_whole_model_paths_agree(scheme, opts):
    """Decoding-sized inputs (fast path) and the fallback give nearly the same logits on a whole model."""
    model = quantize(tiny_model(), scheme, **opts)
    tokens = torch.randint(0, 256, (1, 8))
    set_path(model, "fallback")
    ref = model(tokens)
    set_path(model, "auto")
    fast = model(tokens)
    tol = 0.05 * ref.abs().max().item()
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=tol)


KERNEL_OPS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu", "q8_0": "int4"}


@pytest.mark.skipif(not kernels.has_int4_kernel(CPU), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("scheme,opts", [("int8", {}), ("int4", {"group_size": 32}), ("q8_0", {})])
def test_compiled_decode_step_calls_the_kernels_and_matches_eager(scheme, opts):
    """``generate(compile=True)`` on a quantized model: the compiled graph still calls PyTorch's low-bit kernel
    (seen by the profiler) and gives the eager step's logits (the same bf16 roundings, fused differently)."""
    from torch.profiler import profile

    from minllama.core.cache import StaticKVCache
    from minllama.core.generate import _decode_step, compiled_decode_step

    model = quantize(tiny_model(), scheme, **opts)
    cache = StaticKVCache(model, 1, 32)
    model(torch.randint(0, 256, (1, 6)), torch.arange(6), cache=cache)
    token, pos = torch.tensor([[7]]), torch.tensor([6])
    with torch.no_grad():
        eager = _decode_step(model, token, pos, None, cache)
        step = compiled_decode_step(model)
        step(model, token, pos, None, cache)  # compile
        with profile() as prof:
            compiled = step(model, token, pos, None, cache)
    assert any(KERNEL_OPS[scheme] in e.name for e in prof.events()), "the compiled step skipped the kernel"
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())
