"""The C++ decoder layer against core's model (the oracle): the same logits and cache at every decode step, fp32
and bf16, on a config where no width is a multiple of 16 and heads are grouped; the swap takes only the steps it
can and refuses models it cannot run. Skipped, with the reason, where the extension cannot be built."""
import copy

import pytest
import torch
import torch.nn as nn

from minllama.core.cache import StaticKVCache
from minllama.core.config import LlamaConfig, RopeScaling
from minllama.core.generate import generate
from minllama.core.model import MinimalLlama
from minllama.kernels import cpu_decode, cpu_gemv
from minllama.kernels.cpu_decode import CpuDecodeMixin, cpu_decode_unsupported, layer_weights, remove_cpu_decode, \
    use_cpu_decode

REASON = cpu_gemv.cpu_gemv_supported()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels unavailable: {REASON}")


def odd_model(**overrides) -> MinimalLlama:
    torch.manual_seed(0)  # dim 40, hidden 100, head_dim 10: ragged tails everywhere; 4 query heads share 2 kv heads
    cfg = LlamaConfig.from_name("tiny-gqa", dim=40, hidden_dim=100, **overrides)
    model = MinimalLlama(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, so that attention is not uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def rounded_to_bf16(model: MinimalLlama) -> MinimalLlama:
    """An fp32 copy whose weights and RoPE table are the bf16 model's numbers: the oracle for the bf16 path, which
    computes in fp32 on bf16 weights."""
    return copy.deepcopy(model).bfloat16().float()


def steps(model, tokens, prompt_len):
    """Prefill ``prompt_len`` tokens, then decode the rest one at a time: each step's logits, and the cache."""
    cache = StaticKVCache(model, 1, tokens.shape[1] + 3)
    out = []
    with torch.no_grad():
        model(tokens[:, :prompt_len], cache.reserve(prompt_len), cache=cache)
        for t in range(prompt_len, tokens.shape[1]):
            out.append(model(tokens[:, t:t + 1], cache.reserve(1), cache=cache).float())  # (1, 1, vocab)
    return torch.cat(out, 1), cache


class CountingExtension:
    """Stands in for the built extension: counts the decoder-layer calls, then runs the real ones."""

    def __init__(self, ext):
        self.ext, self.layers = ext, 0

    def decoder_layers(self, x, layers, *args):
        self.layers += len(layers)
        return self.ext.decoder_layers(x, layers, *args)

    def __getattr__(self, name):  # the rest (DecoderWeights, ...) as the extension has it
        return getattr(self.ext, name)

    gemvs = 0

    def gemv(self, *args):
        self.gemvs += 1
        return self.ext.gemv(*args)


@needs_kernel
@pytest.mark.parametrize("rope_scaling", [None, RopeScaling(factor=8.0, original_max_seq_len=16)])
def test_fp32_decode_steps_equal_the_model(rope_scaling):
    model = odd_model(rope_scaling=rope_scaling)
    tokens = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    want, want_cache = steps(model, tokens, 5)
    fast = use_cpu_decode(copy.deepcopy(model))
    assert isinstance(fast, CpuDecodeMixin) and isinstance(fast, MinimalLlama)
    got, got_cache = steps(fast, tokens, 5)  # 65 steps: attention over up to 70 slots
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip((*got_cache.k, *got_cache.v), (*want_cache.k, *want_cache.v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_bf16_decode_steps_compute_in_fp32_on_the_bf16_weights():
    model = odd_model()
    tokens = torch.randint(0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    oracle, _ = steps(rounded_to_bf16(model), tokens, 4)
    got, cache = steps(use_cpu_decode(copy.deepcopy(model).bfloat16()), tokens, 4)
    assert cache.k[0].dtype == torch.bfloat16
    # the only rounding the oracle does not do: keys and values are stored in bf16 (8 bits of mantissa)
    torch.testing.assert_close(got, oracle, rtol=0, atol=0.02 * oracle.abs().max().item())
    plain, _ = steps(copy.deepcopy(model).bfloat16(), tokens, 4)  # eager bf16 rounds every activation too
    assert (got - oracle).abs().max() < (plain - oracle).abs().max()


@needs_kernel
def test_a_bf16_cache_of_an_fp32_model_is_read_and_written_as_cores(monkeypatch):
    """``model.kv_cache_dtype = torch.bfloat16`` (what chat.py does for quantized models): the C++ step computes in
    fp32 and rounds what it stores, as core's cache does; oracle: core's eager forward on the same kind of cache."""
    model = odd_model()
    model.kv_cache_dtype = torch.bfloat16
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    want, want_cache = steps(model, tokens, 5)
    fast = use_cpu_decode(copy.deepcopy(model))
    ext = CountingExtension(cpu_gemv._extension())
    monkeypatch.setattr(cpu_gemv, "_extension", lambda: ext)
    got, got_cache = steps(fast, tokens, 5)
    assert ext.layers == 35 * model.config.n_layers and got_cache.k[0].dtype == torch.bfloat16  # every step in C++
    # both round the same fp32 keys; the sums' order may move one by a bf16 step (2^-8 relative)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
    for a, b in zip((*got_cache.k, *got_cache.v), (*want_cache.k, *want_cache.v)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-5)


@needs_kernel
def test_greedy_generation_is_unchanged():
    model = odd_model()
    prompts = [[1, 2, 3, 4, 5]]
    want = generate(model, prompts, 24)
    assert generate(use_cpu_decode(model), prompts, 24) == want


@needs_kernel
def test_only_one_token_steps_of_one_sequence_without_grad_take_the_fast_path(monkeypatch):
    model = use_cpu_decode(odd_model())
    spy = CountingExtension(cpu_gemv._extension())
    monkeypatch.setattr(cpu_gemv, "_extension", lambda: spy)
    n_layers, vocab = model.config.n_layers, model.config.vocab_size
    one = torch.tensor([[7]])
    with torch.no_grad():
        cache = StaticKVCache(model, 1, 16)
        model(torch.tensor([[1, 2, 3]]), cache.reserve(3), cache=cache)  # prefill
        assert spy.layers == 0
        model(one, cache.reserve(1), cache=cache)
        assert spy.layers == n_layers
        model(one)  # no cache
        batch = StaticKVCache(model, 2, 16)
        model(torch.tensor([[7], [8]]), batch.reserve(1), cache=batch)  # two sequences
        padded = StaticKVCache(model, 1, 16)
        model(one, padded.reserve(1), pad=torch.tensor([0]), cache=padded)  # left padding: core's masks
        assert spy.layers == n_layers
    logits = model(one, cache.reserve(1), cache=cache)  # gradients enabled: training needs autograd
    assert logits.requires_grad and spy.layers == n_layers
    assert model(one).shape == (1, 1, vocab)


@needs_kernel
def test_weights_kept_between_steps_follow_every_change_to_the_model(monkeypatch):
    """The gathered weights are reused from step to step (GatheredWeights): a module swapped in, a buffer or a
    parameter replaced, a class changed or a copy of the model must each be seen at the next step."""
    spy = CountingExtension(cpu_gemv._extension())
    monkeypatch.setattr(cpu_gemv, "_extension", lambda: spy)
    model, tokens = odd_model(), torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    fast = use_cpu_decode(copy.deepcopy(model))

    def same_steps():  # the fast model's decode steps equal core's on the same weights, now
        torch.testing.assert_close(steps(fast, tokens, 4)[0], steps(remove_cpu_decode(copy.deepcopy(fast)), tokens,
                                                                      4)[0], rtol=1e-5, atol=1e-5)

    same_steps()
    attn = fast.layers[1].attention
    attn.wq = nn.Linear(40, 40, bias=False)  # a new module
    same_steps()
    attn.wk.weight = nn.Parameter(torch.randn_like(attn.wk.weight))  # a new parameter
    same_steps()
    int8 = Int8Linear(attn.wv)
    attn.wv = int8
    int8._buffers["scales"] = int8.scales * 2  # replaced as Module._apply does: no setattr, no hook
    same_steps()
    copied = copy.deepcopy(fast)  # a copy keeps no gathered weights of the original
    with torch.no_grad():
        copied.layers[0].feed_forward.w2.weight.mul_(3)
    torch.testing.assert_close(steps(copied, tokens, 4)[0], steps(remove_cpu_decode(copy.deepcopy(copied)), tokens,
                                                                    4)[0], rtol=1e-5, atol=1e-5)
    before = spy.layers
    fast.layers[0].feed_forward.w1.__class__ = LoraLinear  # a class the C++ step does not read: core's forward
    same_steps()
    assert spy.layers == before, "a step ran in C++ with a layer it cannot read"


class LoraLinear(nn.Linear):
    pass


@needs_kernel
@pytest.mark.parametrize("quantized, length", [(False, 9), (True, 9), (True, cpu_decode.STEPWISE_PROMPT + 1)],
                         ids=["float", "quantized-short", "quantized-long"])
def test_a_prompt_runs_its_layers_then_only_its_last_head_in_cpp(monkeypatch, quantized, length):
    """A prompt's layers run in core (a matrix product), except a short one of a quantized model: token by token
    in C++ (core would dequantize every matrix for a few rows). Either way only the last position's head is
    computed, in C++, and the cache and the logits are the model's."""
    model = odd_model(tie_embeddings=quantized)
    if quantized:
        model, oracle = int8_model(model)
    else:
        oracle = copy.deepcopy(model)
    fast = use_cpu_decode(model)
    spy = CountingExtension(cpu_gemv._extension())
    monkeypatch.setattr(cpu_gemv, "_extension", lambda: spy)
    tokens = torch.randint(0, 256, (1, 3 + length), generator=torch.Generator().manual_seed(6))
    stepwise = quantized and length <= cpu_decode.STEPWISE_PROMPT
    with torch.no_grad():
        caches = [StaticKVCache(m, 1, 32) for m in (fast, oracle)]
        for m, c in zip((fast, oracle), caches):  # an earlier turn in the cache: the prompt continues it
            m(tokens[:, :3], c.reserve(3), last_only=True, cache=c)
        spy.layers = spy.gemvs = 0
        got, want = (m(tokens[:, 3:], c.reserve(length), last_only=True, cache=c) for m, c in zip((fast, oracle),
                                                                                                 caches))
        assert spy.layers == (length * len(fast.layers) if stepwise else 0) and spy.gemvs == 1
        assert got.shape == want.shape == (1, 1, 256)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # every slot written, as core does
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        layers = spy.layers
        with pytest.raises(RuntimeError):  # positions that do not match the tokens: core's forward says so
            fast(tokens[:, :4], torch.arange(20, 23), last_only=True, cache=caches[0])
        fast(tokens)  # all positions' logits, or a batch: core's forward and head
        fast(torch.cat([tokens, tokens]), last_only=True)
    assert spy.gemvs == 1 and spy.layers == layers


@needs_kernel
def test_the_swap_keeps_weights_and_subclasses_and_is_undone():
    class MyLlama(MinimalLlama):
        pass

    model = MyLlama(odd_model().config).eval()
    keys = list(model.state_dict())
    use_cpu_decode(model)
    assert type(model).__name__ == "CpuDecodeMyLlama" and isinstance(model, MyLlama)
    assert list(model.state_dict()) == keys and use_cpu_decode(model) is model  # a second call changes nothing
    assert type(remove_cpu_decode(model)) is MyLlama


def test_models_it_cannot_run_are_left_alone_with_the_reason():
    model = odd_model()
    model.layers[1].attention.wq.__class__ = LoraLinear
    assert "layer 1's wq is a LoraLinear" in cpu_decode_unsupported(model)
    assert type(use_cpu_decode(model)) is MinimalLlama
    half = odd_model().half()
    if REASON is None:
        assert "fp32 or bf16" in cpu_decode_unsupported(half)
    biased = odd_model()
    biased.layers[0].feed_forward.w2 = nn.Linear(100, 40)
    if REASON is None:
        assert "layer 0's w2 is a Linear" in cpu_decode_unsupported(biased)
    assert type(use_cpu_decode(half)) is MinimalLlama
    assert "not a MinimalLlama" in cpu_decode_unsupported(nn.Linear(2, 2))

    class ScaledEmbeddings(MinimalLlama):  # e.g. a model that embeds more than token ids (apps/numeric_llama.py)
        def hidden_states(self, tokens, *args, **kwargs):
            return super().hidden_states(tokens, *args, **kwargs) * 2

    custom = ScaledEmbeddings(odd_model().config).eval()
    if REASON is None:
        assert "ScaledEmbeddings overrides hidden_states" in cpu_decode_unsupported(custom)
    assert type(use_cpu_decode(custom)) is ScaledEmbeddings


@needs_kernel
def test_bad_input_to_the_layers_is_one_clear_error_before_anything_is_written():
    model = odd_model()
    cache = StaticKVCache(model, 1, 8)
    layers, ext = layer_weights(model), cpu_gemv._extension()
    x, rope = torch.zeros(40), model.rope[0].contiguous()

    def run(layers, pos=0):
        cfg = model.config
        weights = ext.DecoderWeights(layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads)
        ext.decoder_layers(x, weights, cache.k, cache.v, rope, pos, 1e-5)

    def with_matrix(i, kind, tensors):  # layer 1's matrix i replaced
        norms_and_matrices = list(layers[1])
        norms_and_matrices[2] = [*layers[1][2][:i], (kind, tensors), *layers[1][2][i + 1:]]
        return [layers[0], tuple(norms_and_matrices)]

    with torch.no_grad():
        with pytest.raises(RuntimeError, match="pos 8 is outside the cache of 8"):
            run(layers, pos=8)
        with pytest.raises(RuntimeError, match="layer 1's wk must have 20 rows, got 19"):
            run(with_matrix(1, "float", [model.layers[1].attention.wk.weight[:19].contiguous()]))
        with pytest.raises(RuntimeError, match="layer 1's wq must be fp32 or bf16, got Char \\(int8 weights need"):
            run(with_matrix(0, "float", [model.layers[1].attention.wq.weight.to(torch.int8)]))
        with pytest.raises(RuntimeError, match="layer 1's w2 must be a contiguous \\(N, 100\\) matrix"):
            run(with_matrix(5, "float", [model.layers[1].attention.wq.weight]))
    assert not cache.k[0].any() and not cache.v[0].any(), "layer 0 ran although layer 1 was bad"


class Int8Linear(nn.Module):
    """The int8-per-output-channel layout the C++ layer reads (minllama-quant's Int8Linear has the same buffers;
    this package cannot import it): weight = qweight * scales[:, None]."""

    scheme = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp(min=1e-12) / 127  # (N,)
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))


def int8_model(model: MinimalLlama) -> tuple[MinimalLlama, MinimalLlama]:
    """(model with int8 linear layers, the fp32 model of its dequantized weights: the oracle)."""
    quantized, oracle = copy.deepcopy(model), copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if type(module) is nn.Linear and name != "":
            parent, child = quantized.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, child, Int8Linear(module))
            with torch.no_grad():
                oracle.get_submodule(name).weight.copy_(getattr(parent, child).dequantize())
    if model.config.tie_embeddings:  # the embedding reads the quantized head's rows (quant's QuantEmbedding)
        quantized.tok_embeddings.weight = nn.Parameter(quantized.output.dequantize())
    return quantized, oracle


@needs_kernel
def test_int8_decode_steps_equal_the_model_on_its_dequantized_weights():
    model = odd_model(tie_embeddings=True)  # the head is quantized, the (tied) embedding too in the oracle
    quantized, oracle = int8_model(model)
    assert cpu_decode_unsupported(quantized) is None
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    want, _ = steps(oracle, tokens, 5)
    got, _ = steps(use_cpu_decode(quantized), tokens, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x, layer = torch.randn(40), quantized.layers[0].feed_forward.w1
    torch.testing.assert_close(cpu_gemv._extension().gemv(x, "int8", [layer.qweight, layer.scales]), layer(x),
                               rtol=1e-5, atol=1e-5)
