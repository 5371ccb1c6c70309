"""The KV cache as an object of its own: made by the caller, sized by each attention module, reused by the compiled
decode step, and open to variants that override one attention step."""
import pytest
import torch
import torch.nn as nn

from core_helpers import tiny_model
from minllama.core.cache import StaticKVCache, attention_mask
from minllama.core.config import LlamaConfig
from minllama.core.generate import generate, generate_stream
from minllama.core.model import Attention, MinimalLlama


def test_the_model_holds_no_cache_state():
    model = tiny_model("tiny-gqa")
    generate(model, [[1, 2, 3]], 5)
    assert [name for name, _ in model.named_buffers()] == ["rope"]
    assert not any("cache" in name for name in vars(model.layers[0].attention))


def test_the_cache_is_sized_by_each_attention_module():
    class WideValues(Attention):  # caches 3 kv heads of twice the width: the cache must ask, not assume
        def cache_shape(self):
            return 3, 2 * self.head_dim

    class Wide(MinimalLlama):
        attention_class = WideValues

    model = Wide(LlamaConfig.from_name("tiny-gqa"))
    cache = StaticKVCache(model, 2, 24, dtype=torch.float64)
    assert [tuple(k.shape) for k in cache.k] == [(2, 3, 24, 2 * model.config.head_dim)] * model.config.n_layers
    assert cache.v[1].dtype == torch.float64 and cache.nbytes() == 2 * 2 * (2 * 3 * 24 * 32) * 8
    assert [layer.attention.layer_index for layer in model.layers] == list(range(model.config.n_layers))


def test_a_prompt_attends_over_the_filled_slots_only_and_a_first_one_causally(monkeypatch):
    """A multi-token forward reads only the slots up to its last token (all any of its queries may see): the first
    prompt is plain causal attention (SDPA's fast path, mask None) instead of a masked pass over the whole cache,
    with the same logits; one-token steps keep every slot (fixed shapes for torch.compile)."""
    model = tiny_model("tiny-gqa")
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((k.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)  # no cache: causal over the 12 tokens
        cache = StaticKVCache(model, 1, 100)
        first = model(tokens[:, :7], cache.reserve(7), cache=cache)
        assert seen[-1] == (7, True, True)  # 7 slots of 100, no mask
        rest = model(tokens[:, 7:11], cache.reserve(4), cache=cache)
        assert seen[-1] == (11, False, False)  # slots 0..10, masked causally from position 7
        last = model(tokens[:, 11:], cache.reserve(1), cache=cache)
        assert seen[-1][0] == 100  # decoding: the whole cache, masked
    torch.testing.assert_close(torch.cat([first, rest, last], 1), want, rtol=1e-5, atol=1e-5)


def test_reserve_hands_out_positions_and_refuses_overflow():
    cache = StaticKVCache(tiny_model(), 1, 8)
    assert cache.reserve(5).tolist() == [0, 1, 2, 3, 4] and cache.reserve(1).tolist() == [5]
    assert cache.room(10) == 2 and cache.length == 6
    with pytest.raises(ValueError, match="exceed the cache of 8"):
        cache.reserve(3)
    with pytest.raises(ValueError, match="does not fit the model's context"):
        StaticKVCache(tiny_model(), 1, 10_000)
    with pytest.raises(ValueError, match="needs input_pos"):
        tiny_model()(torch.zeros(1, 2, dtype=torch.long), cache=StaticKVCache(tiny_model(), 1, 8))


def test_attention_mask_against_its_definition():
    slots_q, pad = torch.tensor([3, 4]), torch.tensor([0, 2])
    mask = attention_mask(slots_q, 6, pad)  # (B, 1, T, S)
    for b in range(2):
        for i, q in enumerate(slots_q.tolist()):
            for s in range(6):
                assert bool(mask[b, 0, i, s]) == ((s <= q and s >= pad[b]) or s == q)
    assert attention_mask(torch.arange(5), 5, None) is None  # plain causal: the fast path


@torch.no_grad()
def test_a_cache_passed_explicitly_continues_a_generation():
    """Prefix reuse: a second call that feeds only the new tokens to the same cache gives what a fresh call on the
    whole sequence gives."""
    model = tiny_model("tiny-llama3")
    first, more = [5, 9, 2, 200, 31], [7, 7, 1]
    cache = StaticKVCache(model, 1, 64)
    answer = [int(t) for t in generate_stream(model, [first], 4, cache=cache)]
    assert cache.length == len(first) + 3  # the last answer token was never fed
    again = [int(t) for t in generate_stream(model, [answer[-1:] + more], 6, cache=cache)]
    assert again == generate(model, [first + answer + more], 6)[0]


def test_a_variant_overrides_one_step_and_keeps_the_cache_and_generation():
    class Scaled(Attention):  # a per-head query gain: only `attend` changes
        def __init__(self, cfg, layer_index=0):
            super().__init__(cfg, layer_index)
            self.gain = nn.Parameter(torch.full((cfg.n_heads, 1, 1), 1.0 + layer_index))

        def attend(self, q, k, v, mask):
            return super().attend(q * self.gain, k, v, mask)

    class ScaledLlama(MinimalLlama):
        attention_class = Scaled

    torch.manual_seed(0)
    model = ScaledLlama(LlamaConfig.from_name("tiny-gqa"))
    model.init_weights()
    model.eval()
    assert [float(layer.attention.gain.detach()[0]) for layer in model.layers] == [1.0, 2.0]  # built with its index
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = StaticKVCache(model, 2, 16)
        steps = [model(tokens[:, :7], torch.arange(7), cache=cache)]
        steps += [model(tokens[:, t:t + 1], torch.tensor([t]), cache=cache) for t in range(7, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # the gain really acts: with gain 1 everywhere the model is core's own attention
        plain = MinimalLlama(model.config)
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(plain(tokens), full, atol=1e-3)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    assert generate(model, prompts, 6) == [generate(model, [p], 6)[0] for p in prompts]


def test_the_compiled_decode_step_is_reused_by_a_new_cache_of_the_same_shape():
    from torch._dynamo.utils import counters

    model = tiny_model("tiny-gqa")
    counters.clear()
    first = generate(model, [[1, 2, 3]], 6, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, [[4, 5, 6, 7]], 6, compile=True) == generate(model, [[4, 5, 6, 7]], 6)
    assert counters["stats"]["unique_graphs"] == graphs == 1  # same bucket, new cache object: no recompilation
    assert first == generate(model, [[1, 2, 3]], 6)


def test_a_cache_may_store_keys_and_values_in_bf16_for_an_fp32_model():
    """``model.kv_cache_dtype``: every new cache stores bf16, rounded once when written and read back in fp32;
    the logits stay those of the fp32 cache within bf16's rounding of the keys and values."""
    from minllama.core.paged_cache import PagedKVCache

    model = tiny_model("tiny-gqa")
    with torch.no_grad():
        for p in model.parameters():  # weights of a trained model's scale: attention that is not uniform
            p.normal_(0, 0.3)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))

    def run(cache):
        with torch.no_grad():
            first = model(tokens[:, :8], cache.reserve(8), cache=cache)
            steps = [model(tokens[:, t:t + 1], cache.reserve(1), cache=cache) for t in range(8, 12)]
        return torch.cat([first, *steps], 1)

    full = StaticKVCache(model, 1, 16)
    want = run(full)
    model.kv_cache_dtype = torch.bfloat16
    half = StaticKVCache(model, 1, 16)
    assert half.k[0].dtype == torch.bfloat16 and half.nbytes() * 2 == full.nbytes()
    got = run(half)
    assert got.dtype == torch.float32
    # the first layer's keys and values of the prompt: computed alike, then rounded (the layers after it attend over
    # rounded ones, so their inputs differ a little)
    assert torch.equal(half.k[0][:, :, :8], full.k[0][:, :, :8].bfloat16())
    assert torch.equal(half.v[0][:, :, :8], full.v[0][:, :, :8].bfloat16())
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())
    assert not torch.equal(got[:, 8:], want[:, 8:])  # (the rounding is real)
    assert half.resized(32, model).k[0].dtype == torch.bfloat16  # a conversation that outgrows it keeps it
    assert PagedKVCache(model, 4, 4).k[0].dtype == torch.bfloat16
    assert StaticKVCache(model, 1, 4, dtype=torch.float32).k[0].dtype == torch.float32  # an explicit dtype wins
    assert generate(model, [[1, 2, 3]], 6) == [g for g in generate(model, [[1, 2, 3]], 6)]  # runs end to end
