"""apps/modified_attention.py: differential attention against the paper's formula written out naively, the cases
where λ makes the second map cancel the first or vanish, the KV cache and generation, and a smoke run."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

APPS = Path(__file__).parents[1]
sys.path.insert(0, str(APPS))

import modified_attention as ma  # noqa: E402
from minllama.core.cache import StaticKVCache  # noqa: E402
from minllama.core.config import LlamaConfig  # noqa: E402
from minllama.core.generate import generate  # noqa: E402
from minllama.core.model import MinimalLlama, apply_rope  # noqa: E402


def diff_model(name="tiny-gqa", seed=0, **overrides) -> ma.DiffLlama:
    model = ma.DiffLlama(LlamaConfig.from_name(name, **overrides))
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def naive_diff_attention(attn: ma.DifferentialAttention, x, rope):
    """The paper's equations with explicit attention maps, one differential head at a time."""
    B, T, _ = x.shape
    d, h, h_kv = attn.head_dim, attn.n_diff_heads, attn.n_diff_kv_heads
    q = apply_rope(attn.wq(x).view(B, T, 2 * h, d), rope)  # standard heads 2j, 2j+1 = Q1, Q2 of head j
    k = apply_rope(attn.wk(x).view(B, T, 2 * h_kv, d), rope)
    v = attn.wv(x).view(B, T, h_kv, 2 * d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    lam = (math.exp((attn.lambda_q1 * attn.lambda_k1).sum().item())
           - math.exp((attn.lambda_q2 * attn.lambda_k2).sum().item()) + attn.lambda_init)
    heads = []
    for j in range(h):
        g = j // (h // h_kv)  # the KV head this query head reads (grouped-query attention)
        maps = []
        for m in range(2):
            scores = q[:, :, 2 * j + m] @ k[:, :, 2 * g + m].transpose(1, 2) / math.sqrt(d)  # (B, T, T)
            maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
        o = (maps[0] - lam * maps[1]) @ v[:, :, g]  # (B, T, 2d)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + attn.subln.eps) * attn.subln.weight  # per-head RMSNorm
        heads.append(o * (1 - attn.lambda_init))
    return attn.wo(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mha"])
def test_matches_the_papers_formula_in_value_and_gradient(name):
    model = diff_model(name)
    attn = model.layers[1].attention
    with torch.no_grad():
        attn.subln.weight.uniform_(0.5, 1.5)  # not all ones: the norm's gain must be applied per channel
    x = torch.randn(2, 9, model.config.dim)
    rope = model.rope[:9]
    ours = attn(x, rope, None, None)
    ref = naive_diff_attention(attn, x, rope)
    assert torch.allclose(ours, ref, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), attn.wq.weight)
    (g_ref,) = torch.autograd.grad(naive_diff_attention(attn, x, rope).square().sum(), attn.wq.weight)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    assert attn.lambda_q1.requires_grad and attn.lam().requires_grad  # λ is learned


def set_lambda(attn, value: float):
    """Choose the λ vectors so that exp(λq1·λk1) - exp(λq2·λk2) + λ_init == value exactly."""
    with torch.no_grad():
        for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2):
            p.zero_()
        target = value - attn.lambda_init  # = exp(a) - exp(b); one of a, b stays 0
        if target >= 0:
            attn.lambda_q1[0] = attn.lambda_k1[0] = math.sqrt(math.log(1 + target))
        else:
            attn.lambda_q2[0] = attn.lambda_k2[0] = math.sqrt(math.log(1 - target))
    assert abs(attn.lam().item() - value) < 1e-6


def test_identical_maps_with_lambda_one_cancel_completely():
    model = diff_model()
    attn = model.layers[0].attention
    d = attn.head_dim
    with torch.no_grad():  # Q2 := Q1 and K2 := K1 in every differential head: the two maps are equal
        for w in (attn.wq.weight, attn.wk.weight):
            pairs = w.view(-1, 2, d, w.size(1))
            pairs[:, 1] = pairs[:, 0]
    x = torch.randn(2, 7, model.config.dim)
    set_lambda(attn, 0.5)
    half = attn(x, model.rope[:7], None, None).abs().max()  # half of the map cancels: something is left
    set_lambda(attn, 1.0)
    cancelled = attn(x, model.rope[:7], None, None).abs().max()  # the noise-cancelling limit: nothing is left
    assert half > 1e-2 and cancelled < 1e-4 * half  # (float rounding, amplified by the per-head norm's 1/√eps)


def test_lambda_zero_ignores_the_second_map_and_nonzero_does_not():
    model = diff_model()
    attn = model.layers[0].attention
    x, rope = torch.randn(1, 6, model.config.dim), model.rope[:6]
    d = attn.head_dim

    def with_q2_perturbed():
        saved = attn.wq.weight.detach().clone()
        with torch.no_grad():
            attn.wq.weight.view(-1, 2, d, model.config.dim)[:, 1] += torch.randn(attn.n_diff_heads, d,
                                                                                 model.config.dim)
        y = attn(x, rope, None, None)
        with torch.no_grad():
            attn.wq.weight.copy_(saved)
        return y

    set_lambda(attn, 0.0)
    assert torch.allclose(attn(x, rope, None, None), with_q2_perturbed(), atol=1e-6)
    set_lambda(attn, 0.3)
    assert not torch.allclose(attn(x, rope, None, None), with_q2_perturbed(), atol=1e-3)


def test_lambda_init_follows_the_depth_schedule_and_init_starts_near_it():
    model = diff_model(n_layers=4)
    inits = [layer.attention.lambda_init for layer in model.layers]
    assert inits == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(4)])
    assert inits[0] == pytest.approx(0.2)
    for layer in model.layers:  # λ vectors ~ N(0, 0.1²): λ - λ_init has a std of about 0.06 at head_dim 16
        assert abs(layer.attention.lam().item() - layer.attention.lambda_init) < 0.3


def test_same_weights_as_the_standard_model_plus_lambda_and_norms():
    diff = diff_model()
    std = MinimalLlama(LlamaConfig.from_name("tiny-gqa"))
    torch.manual_seed(0)  # the seed diff_model uses: as in the experiment, both models start from the same weights
    std.init_weights()
    extra = {k: v.shape for k, v in diff.state_dict().items() if k not in std.state_dict()}
    assert all(torch.equal(diff.state_dict()[k], v) for k, v in std.state_dict().items())
    per_layer = {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight"}
    assert {k.split("attention.")[1] for k in extra} == per_layer


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mha"])
def test_kv_cache_decoding_equals_the_full_forward(name):
    model = diff_model(name)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = StaticKVCache(model, 2, 32)  # core's cache, unchanged: differential heads pair standard ones
        assert cache.k[0].shape == (2, model.config.n_kv_heads, 32, model.config.head_dim)
        prefill = model(tokens[:, :8], torch.arange(8), cache=cache)
        steps = [model(tokens[:, t:t + 1], torch.tensor([t]), cache=cache) for t in range(8, 12)]
    assert torch.allclose(prefill, full[:, :8], atol=1e-5)
    assert torch.allclose(torch.cat(steps, 1), full[:, 8:], atol=1e-5)


def test_generate_batches_left_padded_prompts_like_single_ones():
    model = diff_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6]]
    batched = generate(model, prompts, max_new_tokens=6)
    alone = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    full = list(prompts[1])  # greedy decoding through the cache = argmax of full forwards
    with torch.no_grad():
        for _ in range(6):
            full.append(int(model(torch.tensor([full]))[0, -1].argmax()))
    assert alone[1] == full[len(prompts[1]):]


def test_odd_head_counts_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="must both be even"):
        ma.DiffLlama(LlamaConfig.from_name("tiny-mqa"))


def test_corpus_is_real_text_and_split_without_overlap():
    train, val = ma.byte_corpus()
    assert train.numel() > 100_000 and val.numel() > 10_000 and int(train.max()) < 256
    text = bytes(val[:2000].tolist()).decode("utf-8", errors="replace")
    assert sum(c.isalpha() for c in text) > len(text) / 2  # prose, mostly letters


def test_smoke_run_writes_the_figures_and_a_consistent_analysis(tmp_path):
    results = ma.main(["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--dim", "32", "--layers", "2",
                       "--eval-every", "2", "--eval-batches", "1", "--out", str(tmp_path)])
    for f in ("loss_curves.png", "results.json", "analysis.txt"):
        assert (tmp_path / f).stat().st_size > 0
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    s, d = results["standard"], results["differential"]
    assert d["params"] - s["params"] == 2 * (4 * 8 + 16)  # per layer: 4 λ vectors of head_dim + subln of 2 head_dim
    assert math.isfinite(s["final_val_loss"]) and math.isfinite(d["final_val_loss"])
    assert s["tokens_per_s"] > 0 and d["tokens_per_s"] > 0
    assert len(d["lambda_per_layer"]) == 2
    assert d["sample"].startswith("Return the ")


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, APPS / "modified_attention.py", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for option in ("--out", "--steps", "--batch-size", "--seq-len", "--dim", "--heads", "--kv-heads", "--lr"):
        assert option in out.stdout
    bad = subprocess.run([sys.executable, APPS / "modified_attention.py", "--heads", "3"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "must be even" in bad.stderr
