"""minllama-kernels' C++ decode step on minllama-quant's int8, int4 and GGUF-block layers (the two packages never
import each other: the step reads each layout by its documented buffers). Oracle: the same quantized model on
quant's fallback path, which multiplies by the dequantized weights in fp32."""
import copy

import pytest
import torch

from minllama.core.cache import StaticKVCache
from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.dtypes import cpu_flags
from minllama.core.model import MinimalLlama
from minllama.kernels.cpu_decode import cpu_decode_unsupported, use_cpu_decode
from minllama.kernels.cpu_gemv import _extension, cpu_gemv_supported
from minllama.quant import quantize
from minllama.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(cpu_gemv_supported() is not None,
                                reason=f"CPU kernels unavailable: {cpu_gemv_supported()}")


def quantized_model(scheme: str, dim: int = 40, hidden_dim: int = 100, **options) -> MinimalLlama:
    torch.manual_seed(0)
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa", dim=dim, hidden_dim=hidden_dim,
                                               tie_embeddings=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return quantize(model, scheme, **options)


# GGUF blocks need rows of a multiple of 32 weights; int4 with groups of 64 pads the last group of 40 and 100
CASES = [("int8", {}), ("int4", dict(group_size=32, head="int8")), ("int4", dict(group_size=64)),
         ("q4_1", dict(dim=64, hidden_dim=96)), ("q4_0", dict(dim=64, hidden_dim=96)),
         ("q8_0", dict(dim=64, hidden_dim=96))]


@pytest.fixture(params=[False, True], ids=["fp32-dot", "integer-dot"])
def integer_dot(request):
    """The C++ step's two ways with 4-bit and GGUF blocks (see minllama-kernels' csrc/blocks.h): fp32, exact on x,
    or integer dot products on x rounded to int8 per block of 32 (AVX512-VNNI; int8-per-channel is always fp32)."""
    if request.param and "avx512_vnni" not in (cpu_flags() or set()):
        pytest.skip("the CPU has no AVX512-VNNI: the integer path never runs here")
    ext = _extension()
    before = ext.set_integer_dot(request.param)
    yield request.param
    ext.set_integer_dot(before)


@pytest.mark.parametrize("scheme,options", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_steps_equal_quants_fp32_fallback_path(scheme, options, integer_dot):
    model = quantized_model(scheme, **options)
    for m in model.modules():
        if isinstance(m, QuantLinear):  # prefill: x @ dequantize().T in fp32 (the packed kernels round x to bf16)
            m.path = "fallback"
    oracle = copy.deepcopy(model)  # decodes on that path too; the C++ step ignores it
    fast = use_cpu_decode(model)
    assert cpu_decode_unsupported(fast) is None and type(fast).__name__.startswith("CpuDecode")
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, m in (("oracle", oracle), ("fast", fast)):
        cache = StaticKVCache(m, 1, 32)
        with torch.no_grad():
            m(tokens[:, :4], cache.reserve(4), cache=cache)
            logits[name] = torch.cat([m(tokens[:, t:t + 1], cache.reserve(1), cache=cache)
                                      for t in range(4, 30)], 1)
    want = logits["oracle"]
    # rounding x to 8 bits moves a logit by up to ~5% of the largest here (minllama-kernels' test_kernels_cpu_blocks.py
    # checks that path's GEMV to fp32 rounding); int8-per-channel never rounds x
    tolerance = 0.1 if integer_dot and scheme != "int8" else 1e-5
    torch.testing.assert_close(logits["fast"], want, rtol=0, atol=tolerance * want.abs().max().item())
    if tolerance < 0.1:  # (rounded x: a near-tie between two tokens of this random model may go the other way)
        assert generate(fast, [[1, 2, 3]], 12) == generate(oracle, [[1, 2, 3]], 12)


def test_schemes_without_a_cpp_layout_are_left_to_quants_own_kernels():
    model = quantized_model("nf4")
    assert "NF4Linear" in cpu_decode_unsupported(model)
    assert type(use_cpu_decode(model)) is MinimalLlama
