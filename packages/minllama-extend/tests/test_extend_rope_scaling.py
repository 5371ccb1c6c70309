"""RoPE scaling against its published formulas and against transformers (inverse frequencies, attention factor and
whole-model logits with the same rope_scaling config)."""
import json
import math

import pytest
import torch

from extend_helpers import hf_fp32_kwargs, tiny_model
from minllama.extend.rope_scaling import (METHODS, RopeScalingMethod, base_frequencies, save_hf_scaled, scale_rope,
                                          unscale_rope, yarn_mscale)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

THETA, HEAD_DIM, ORIGINAL, FACTOR = 10000.0, 64, 256, 4.0


def hf_config(rope_scaling: dict, max_position_embeddings: int, theta: float = THETA) -> HFConfig:
    return HFConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM, rope_theta=theta,
                    max_position_embeddings=max_position_embeddings, rope_scaling=rope_scaling)


def test_linear_is_frequencies_over_factor():
    spec = RopeScalingMethod("linear", FACTOR, ORIGINAL)
    ours = spec.frequencies(THETA, HEAD_DIM)
    published = torch.tensor([THETA ** (-2 * i / HEAD_DIM) / FACTOR for i in range(HEAD_DIM // 2)])
    torch.testing.assert_close(ours, published)
    hf, scale = ROPE_INIT_FUNCTIONS["linear"](hf_config({"rope_type": "linear", "factor": FACTOR}, ORIGINAL), "cpu")
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)
    assert spec.attention_factor == scale == 1.0


def test_ntk_keeps_the_fastest_pair_and_slows_the_slowest_by_factor():
    ours = RopeScalingMethod("ntk", FACTOR, ORIGINAL).frequencies(THETA, HEAD_DIM)
    plain = base_frequencies(THETA, HEAD_DIM)
    assert ours[0] == plain[0]
    # published: base' = base * s^(d/(d-2)), so the slowest pair i = d/2 - 1 turns exactly s times slower
    torch.testing.assert_close(plain[-1] / ours[-1], torch.tensor(FACTOR), rtol=1e-5, atol=0)
    # transformers' dynamic NTK with factor 1 at length s * L is the static NTK base
    hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config({"rope_type": "dynamic", "factor": 1.0}, ORIGINAL), "cpu",
                                           seq_len=int(FACTOR * ORIGINAL))
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seq_len", [1, ORIGINAL - 1, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL, 10 * ORIGINAL])
def test_dynamic_ntk_matches_transformers(seq_len):
    spec = RopeScalingMethod("dynamic", FACTOR, ORIGINAL)
    ours = spec.frequencies(THETA, HEAD_DIM, seq_len)
    hf, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config({"rope_type": "dynamic", "factor": FACTOR}, ORIGINAL), "cpu",
                                           seq_len=seq_len)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    if seq_len <= ORIGINAL:
        assert torch.equal(ours, base_frequencies(THETA, HEAD_DIM))


@pytest.mark.parametrize("beta", [(32.0, 1.0), (16.0, 2.0)])
@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_yarn_matches_transformers_and_the_paper(beta, factor):
    spec = RopeScalingMethod("yarn", factor, ORIGINAL, beta_fast=beta[0], beta_slow=beta[1])
    ours = spec.frequencies(THETA, HEAD_DIM)
    cfg = hf_config({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": ORIGINAL,
                     "beta_fast": beta[0], "beta_slow": beta[1]}, int(factor * ORIGINAL))
    hf, scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    assert spec.attention_factor == pytest.approx(scale) == pytest.approx(0.1 * math.log(factor) + 1)
    # the paper's rule: pairs that turn more than beta_fast times in L are kept, fewer than beta_slow interpolated
    plain = base_frequencies(THETA, HEAD_DIM)
    turns = ORIGINAL * plain / (2 * math.pi)
    assert torch.equal(ours[turns > beta[0]], plain[turns > beta[0]])
    torch.testing.assert_close(ours[turns < beta[1]], plain[turns < beta[1]] / factor)


def test_llama3_matches_transformers():
    spec = RopeScalingMethod("llama3", 8.0, ORIGINAL, low_freq_factor=1.0, high_freq_factor=4.0)
    ours = spec.frequencies(500000.0, HEAD_DIM)
    cfg = hf_config({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": ORIGINAL}, 8 * ORIGINAL, theta=500000.0)
    hf, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=0)
    assert spec.attention_factor == scale == 1.0
    assert yarn_mscale(1.0) == 1.0


# ---------------------------------------------------------------------------- whole model against transformers
SMALL_ORIGINAL = 32  # the tiny model "was trained" on 32 tokens; it is scaled 4x to its 128-token table


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_scaled_model_logits_match_transformers(method, tmp_path):
    model = tiny_model("tiny-gqa", sharp=8.0)
    tokens = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(0))
    plain = model(tokens)
    scale_rope(model, method, 4.0, original_max_seq_len=SMALL_ORIGINAL)
    ours = model(tokens)
    save_hf_scaled(model, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", **hf_fp32_kwargs()).eval()
    expected = json.loads((tmp_path / "hf" / "config.json").read_text())
    if method == "ntk":
        assert expected["rope_theta"] > model.config.rope_theta
    else:
        assert hf.config.rope_parameters["rope_type"] == method
    torch.testing.assert_close(ours, hf(tokens).logits, rtol=1e-4, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the scaling is visible: the test would see a wrong table


@torch.no_grad()
def test_dynamic_ntk_changes_nothing_up_to_the_original_length():
    model = tiny_model("tiny-gqa", sharp=8.0)
    tokens = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    before_short, before_long = model(tokens[:, :SMALL_ORIGINAL]), model(tokens)
    scale_rope(model, "dynamic", 4.0, original_max_seq_len=SMALL_ORIGINAL)
    assert torch.equal(model(tokens[:, :SMALL_ORIGINAL]), before_short)
    assert (model(tokens) - before_long).abs().max() > 1e-2  # past it, the frequencies follow the length
    assert torch.equal(model(tokens[:, :SMALL_ORIGINAL]), before_short)  # and come back below it
    unscale_rope(model, max_seq_len=128)
    torch.testing.assert_close(model(tokens), before_long, rtol=0, atol=0)


def test_scale_rope_grows_the_context_and_refuses_bad_input():
    model = tiny_model("tiny-gqa")
    with pytest.raises(ValueError, match="unknown RoPE scaling method"):
        scale_rope(model, "xpos", 2.0)
    with pytest.raises(ValueError, match="factor"):
        scale_rope(model, "linear", 0.5)
    scale_rope(model, "yarn", 4.0)
    assert model.config.max_seq_len == 512 and model.rope.shape == (512, 8, 2)
    assert model(torch.zeros(1, 300, dtype=torch.long)).shape == (1, 300, 256)
    with pytest.raises(ValueError, match="already has a scaled RoPE"):
        scale_rope(model, "linear", 2.0)
    with pytest.raises(ValueError, match="trained with Llama 3.1 RoPE scaling"):
        scale_rope(tiny_model("tiny-llama3"), "yarn", 2.0)
