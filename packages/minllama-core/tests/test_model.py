"""The model on its own: shapes, the KV cache against full recomputation, padding, RoPE against its formula."""
import math

import pytest
import torch

from core_helpers import TINY, tiny_model
from minllama.core.cache import StaticKVCache
from minllama.core.config import PRESETS, LlamaConfig
from minllama.core.model import MinimalLlama, apply_rope, rope_cache, rope_frequencies


def test_logits_shape(tiny):
    tokens = torch.randint(0, tiny.config.vocab_size, (3, 11))
    assert tiny(tokens).shape == (3, 11, tiny.config.vocab_size)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_recomputation(name):
    model = tiny_model(name)
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = StaticKVCache(model, 2, 32)
        steps = [model(tokens[:, :8], torch.arange(8), cache=cache)]  # prefill 8, then one token at a time
        steps += [model(tokens[:, t:t + 1], torch.tensor([t]), cache=cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_equals_unpadded_row():
    model = tiny_model("tiny-gqa")
    short = torch.randint(0, 256, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)  # 3 slots of left padding
    with torch.no_grad():
        alone = model(short)
        batched = model(padded, torch.arange(8), pad=torch.tensor([3]), cache=StaticKVCache(model, 1, 16))
    torch.testing.assert_close(batched[:, 3:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched).all()  # padding queries must not produce NaN that could leak


def test_tied_embeddings_share_storage():
    model = tiny_model("tiny-mqa")
    assert model.output.weight is model.tok_embeddings.weight
    untied = tiny_model("tiny-mqa", tie_embeddings=False)
    assert untied.num_params() - model.num_params() == model.config.vocab_size * model.config.dim


def test_rope_rotates_pairs_by_position_times_frequency():
    cfg = LlamaConfig.from_name("tiny-gqa")
    inv_freq = rope_frequencies(cfg)
    expected = [cfg.rope_theta ** (-2 * i / cfg.head_dim) for i in range(cfg.head_dim // 2)]
    torch.testing.assert_close(inv_freq, torch.tensor(expected), rtol=1e-6, atol=0)
    x = torch.randn(1, 7, 2, cfg.head_dim)
    y = apply_rope(x, rope_cache(inv_freq, 7))
    p, i = 5, 3  # position 5, pair 3: a 2-D rotation by 5 * inv_freq[3]
    a = 5 * expected[3]
    x0, x1 = x[0, p, 1, 2 * i], x[0, p, 1, 2 * i + 1]
    torch.testing.assert_close(y[0, p, 1, 2 * i:2 * i + 2],
                               torch.stack([x0 * math.cos(a) - x1 * math.sin(a), x1 * math.cos(a) + x0 * math.sin(a)]))
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
    cache = rope_cache(inv_freq, 40)

    def dot(m, n):
        return (apply_rope(q.view(1, 1, 1, -1), cache[m:m + 1]) * apply_rope(k.view(1, 1, 1, -1), cache[n:n + 1])).sum()
    torch.testing.assert_close(dot(10, 4), dot(30, 24), atol=1e-4, rtol=1e-4)


def test_rope_as_complex_multiplication_equals_the_rotation_spelled_out(monkeypatch):
    """Eager RoPE multiplies complex numbers; under torch.compile (no complex code in Inductor) the same product is
    written with cos and sin: both branches give the same numbers, also for a bf16 x and a per-row table."""
    cfg = LlamaConfig.from_name("tiny-gqa")
    torch.manual_seed(0)
    table = rope_cache(rope_frequencies(cfg), 9)
    strided = torch.randn(2, 9, 3, 2 * cfg.head_dim)[..., ::2]  # a view: channels 2 apart (no complex view of it)
    for x, rope in ((torch.randn(2, 9, 3, cfg.head_dim), table), (torch.randn(2, 9, 3, cfg.head_dim).bfloat16(),
                                                                   table.expand(2, -1, -1, -1)), (strided, table)):
        eager = apply_rope(x, rope)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        spelled = apply_rope(x, rope)
        monkeypatch.undo()
        assert eager.dtype == x.dtype
        torch.testing.assert_close(eager, spelled, rtol=1e-6, atol=1e-6)


def test_llama31_rope_scaling_matches_published_rule():
    """Meta's rule: wavelength > orig/low -> freq/factor; < orig/high -> unchanged; in between, blended."""
    cfg = LlamaConfig.from_name("llama3.1-8b")
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 128, 2).double() / 128))
    s = cfg.rope_scaling
    expected = []
    for f in base.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            expected.append(f)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            expected.append(f / s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            expected.append((1 - smooth) * f / s.factor + smooth * f)
    torch.testing.assert_close(rope_frequencies(cfg).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_presets_are_consistent():
    for name, cfg in PRESETS.items():
        assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.head_dim * cfg.n_heads == cfg.dim, name
    with pytest.raises(KeyError, match="unknown model config"):
        LlamaConfig.from_name("llama9-1t")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_param_count_of_a_preset_on_the_meta_device():
    with torch.device("meta"):
        model = MinimalLlama(LlamaConfig.from_name("llama2-7b"))
    assert model.num_params() == 6_738_415_616  # the published Llama-2-7B size


def test_too_long_input_is_a_clear_error():
    model = tiny_model("tiny-gqa")
    with pytest.raises(ValueError, match="exceed the model's context"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))


def test_a_subclass_can_replace_one_piece():
    """Swap the feed-forward for a ReLU^2 one: only that class changes, the rest (cache, RoPE) is reused."""
    import torch.nn as nn

    class ReluSquaredFFN(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.up, self.down = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False), nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)) ** 2)

    class MyLlama(MinimalLlama):
        feed_forward_class = ReluSquaredFFN

    model = MyLlama(LlamaConfig.from_name("tiny-gqa"))
    assert isinstance(model.layers[1].feed_forward, ReluSquaredFFN)
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 256)


def test_meta_device_init_then_materialize():
    with torch.device("meta"):
        model = MinimalLlama(LlamaConfig.from_name("tiny-llama3"))
    model.to_empty(device="cpu")
    model.init_weights()
    reference = tiny_model("tiny-llama3")
    torch.testing.assert_close(model.rope, reference.rope)
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long))).all()


def test_compiled_forward_matches_eager():
    model = tiny_model("tiny-gqa")
    tokens = torch.randint(0, 256, (1, 9))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_plain_forward_ignores_and_keeps_an_existing_cache():
    model = tiny_model("tiny-gqa")
    tokens = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        before = model(tokens)
        cache = StaticKVCache(model, 1, 16)  # a cache of another batch size, left over from generation
        model(tokens[:1, :3], torch.arange(3), cache=cache)
        snapshot = cache.k[0].clone()
        torch.testing.assert_close(model(tokens), before)
    assert torch.equal(cache.k[0], snapshot)


def test_hidden_states_are_what_the_head_reads():
    model = tiny_model("tiny-llama3")
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        h = model.hidden_states(tokens)
        torch.testing.assert_close(model.output(h), model(tokens))
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])


def test_preset_overrides_rederive_the_derived_fields():
    assert LlamaConfig.from_name("tiny-gqa", dim=128).head_dim == 32  # 128 / 4 heads, not the preset's 16
    cfg = LlamaConfig.from_name("llama2-7b", n_heads=16)  # MHA preset: n_kv_heads follows n_heads
    assert (cfg.n_kv_heads, cfg.head_dim) == (16, 256)
    assert LlamaConfig.from_name("smollm2-135m") == PRESETS["smollm2-135m"]


def test_given_embeddings_replace_the_token_lookup():
    """hidden_states(..., embeddings=E) runs the blocks on E: the looked-up embeddings give the plain result, and
    changing one position's vector changes that position and the later ones only (causality)."""
    model = tiny_model("tiny-gqa")
    tokens = torch.randint(0, 256, (2, 9))
    emb = model.tok_embeddings(tokens)  # (B, T, dim)
    torch.testing.assert_close(model.hidden_states(tokens, embeddings=emb), model.hidden_states(tokens))
    emb2 = emb.clone()
    emb2[:, 4] *= 3.0
    h, h2 = model.hidden_states(tokens), model.hidden_states(tokens, embeddings=emb2)
    torch.testing.assert_close(h2[:, :4], h[:, :4])
    assert (h2[:, 4:] - h[:, 4:]).abs().amax(dim=-1).min() > 1e-4
