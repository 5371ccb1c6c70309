"""minllama-kernels' C++ decode step on minllama-quant's int8 layers (the two packages never import each other: the
step reads the int8 layout by its documented buffers). Oracle: the same quantized model on quant's fallback path,
which multiplies by the dequantized weights in fp32."""
import copy

import pytest
import torch

from minllama.core.cache import StaticKVCache
from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.model import MinimalLlama
from minllama.kernels.cpu_decode import cpu_decode_unsupported, use_cpu_decode
from minllama.kernels.cpu_gemv import cpu_gemv_supported
from minllama.quant import quantize
from minllama.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(cpu_gemv_supported() is not None,
                                reason=f"CPU kernels unavailable: {cpu_gemv_supported()}")


def quantized_model(scheme: str, **options) -> MinimalLlama:
    torch.manual_seed(0)
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa", dim=40, hidden_dim=100, tie_embeddings=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return quantize(model, scheme, **options)


def test_int8_steps_equal_quants_fp32_fallback_path():
    model = quantized_model("int8")
    oracle = copy.deepcopy(model)
    for m in oracle.modules():
        if isinstance(m, QuantLinear):
            m.path = "fallback"  # x @ dequantize().T in fp32 (the packed kernel takes bf16 activations)
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
    torch.testing.assert_close(logits["fast"], logits["oracle"], rtol=1e-5, atol=1e-5)
    assert generate(fast, [[1, 2, 3]], 12) == generate(oracle, [[1, 2, 3]], 12)


def test_4bit_models_are_left_to_quants_own_kernels():
    model = quantized_model("int4", group_size=32)
    assert "Int4Linear" in cpu_decode_unsupported(model)
    assert type(use_cpu_decode(model)) is MinimalLlama
