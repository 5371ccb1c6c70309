"""The CPU GEMV kernel against F.linear (the oracle), on odd shapes, and the swap on a model: same logits, same
greedy tokens. Skipped, with the reason, where the kernel cannot be built (no AVX-512 or no C++ compiler)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.model import MinimalLlama
from minllama.kernels import cpu_gemv
from minllama.kernels.cpu_gemv import GemvLinear, gemv, remove_cpu_gemv, use_cpu_gemv

REASON = cpu_gemv.cpu_gemv_supported()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"CPU GEMV kernel unavailable: {REASON}")

# K: below one 16-lane register, ragged tails, exact multiples; N: 1, not a multiple of the 4-row unroll, > grain
SHAPES = [(1, 1), (5, 7), (17, 1), (33, 7), (64, 64), (100, 13), (576, 193), (1000, 130)]


@needs_kernel
@pytest.mark.parametrize("K,N", SHAPES)
def test_fp32_matches_f_linear(K, N):
    g = torch.Generator().manual_seed(K * 1000 + N)
    x, w = torch.randn(K, generator=g), torch.randn(N, K, generator=g)
    y = gemv(x, w)
    assert cpu_gemv.cpu_gemv_usable() and y.shape == (N,) and y.dtype == torch.float32
    ref = F.linear(x.double(), w.double())  # the exact sum; fp32 summation orders differ by a few ulps
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("K,N", SHAPES)
def test_bf16_weights_match_f_linear_on_the_rounded_weights(K, N):
    g = torch.Generator().manual_seed(K + N)
    x, w = torch.randn(K, generator=g), torch.randn(N, K, generator=g).bfloat16()
    y = gemv(x, w)  # bf16 weights widened exactly, fp32 arithmetic: as accurate as fp32 on the rounded weights
    ref = F.linear(x.double(), w.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="x \\(K,\\) and weight \\(N, K\\)"):
        gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="x \\(K,\\) and weight \\(N, K\\)"):
        gemv(torch.randn(9), torch.randn(4, 8))
    with pytest.raises(ValueError, match="fp32 or bf16 weights on the CPU"):
        gemv(torch.randn(8), torch.randn(4, 8).half())


def odd_model() -> MinimalLlama:
    torch.manual_seed(0)  # dim 40 and hidden 100: no width is a multiple of 16
    return MinimalLlama(LlamaConfig.from_name("tiny-gqa", dim=40, hidden_dim=100)).eval()


class CountingExtension:
    """Stands in for the built extension: counts the kernel calls, then runs the real kernel."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def gemv(self, *args):
        self.calls += 1
        return self.ext.gemv(*args)


@needs_kernel
def test_swap_gives_the_same_decode_logits_and_keeps_prefill_and_training_on_f_linear(monkeypatch):
    model = odd_model()
    tokens = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        ref = model(tokens)
    use_cpu_gemv(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is GemvLinear for m in linears)
    spy = CountingExtension(cpu_gemv._extension())
    monkeypatch.setattr(cpu_gemv, "_extension", lambda: spy)
    with torch.no_grad():
        out = model(tokens)
        assert spy.calls == len(linears), "every linear of a one-token step runs the kernel"
        model(torch.randint(0, model.config.vocab_size, (1, 5)))
        assert spy.calls == len(linears), "prefill (T > 1) stays on F.linear"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model(tokens).sum().backward()  # grad enabled, trainable weights: nn.Linear's forward, so backward works
    assert spy.calls == len(linears) and model.output.weight.grad is not None
    remove_cpu_gemv(model)
    assert not any(type(m) is GemvLinear for m in model.modules())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generation_is_unchanged_by_the_swap(dtype):
    model = odd_model().to(dtype)
    prompts = [[1, 2, 3, 4, 5]]
    ref = generate(model, prompts, 12)
    out = generate(use_cpu_gemv(model), prompts, 12)
    if dtype == torch.float32:
        assert out == ref
    else:  # bf16 activations: our fp32 sum rounds once, like F.linear's, but the order differs; near-ties may flip
        assert out[0][:4] == ref[0][:4]


def test_fallback_without_the_kernel_is_f_linear_and_leaves_the_model_alone(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "cpu_gemv_supported", lambda: "no AVX-512 (simulated)")
    cpu_gemv._extension.cache_clear()
    try:
        x, w = torch.randn(33), torch.randn(7, 33)
        with pytest.warns(UserWarning, match="falls back to F.linear: no AVX-512"):
            torch.testing.assert_close(gemv(x, w), F.linear(x, w))
        model = odd_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            use_cpu_gemv(model)
        assert not any(type(m) is GemvLinear for m in model.modules())
    finally:
        cpu_gemv._extension.cache_clear()
