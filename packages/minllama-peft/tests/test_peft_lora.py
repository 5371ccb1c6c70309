"""LoRA on a MinimalLlama: the config, the standard init, what trains, dropout, several adapters."""
import math

import pytest
import torch
import torch.nn.functional as F

from minllama.peft import (AdapterError, LoraConfig, LoraLinear, adapter_names, adapter_parameters, add_adapter,
                           apply_lora, delete_adapter, disabled_adapters, load_adapter, merge, save_adapter,
                           set_adapter, trainable_parameter_count)
from peft_helpers import base_state, randomize_adapter, tiny_model, tokens


def lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_config_validates_and_scales():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(16))  # rsLoRA paper
    assert LoraConfig(targets=("q_proj", "down_proj", "wq")).targets == ("wq", "w2")  # HF names are aliases
    with pytest.raises(AdapterError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(AdapterError, match="unknown LoRA target"):
        LoraConfig(targets=("attn",))


def test_wraps_exactly_the_targets_and_freezes_the_base(tiny):
    apply_lora(tiny, LoraConfig(r=4, targets=("wq", "w2", "output"), layers=(1,)))
    wrapped = sorted(n for n, m in tiny.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == ["layers.1.attention.wq", "layers.1.feed_forward.w2", "output"]
    trainable = sorted(n for n, p in tiny.named_parameters() if p.requires_grad)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable) and len(trainable) == 6
    cfg = tiny.config
    r = 4  # r * (in + out) per adapted layer
    expected = r * ((cfg.dim + cfg.n_heads * cfg.head_dim) + (cfg.hidden_dim + cfg.dim) + (cfg.dim + cfg.vocab_size))
    assert trainable_parameter_count(tiny)[0] == expected
    with pytest.raises(AdapterError, match="layers"):
        apply_lora(tiny, LoraConfig(layers=(7,)), "other")


def test_standard_init_starts_as_the_base_model(tiny):
    ids = tokens(tiny)
    with torch.no_grad():
        base = tiny(ids)
    apply_lora(tiny, LoraConfig(r=4, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), use_dora=True))
    m = tiny.layers[0].attention.wq
    assert torch.all(m.lora_B["default"] == 0)
    bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt 5) = nn.Linear's default: U(-1/sqrt(in), ..)
    A = m.lora_A["default"]
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    torch.testing.assert_close(m.lora_magnitude["default"], m.base.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_training_reduces_the_loss_and_leaves_the_base_bit_identical(dora):
    model = tiny_model("tiny-gqa")
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("wq", "wv", "w1", "w2"), dropout=0.1, use_dora=dora))
    before = base_state(model)
    ids = tokens(model, batch=4, length=24)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    after = base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_dropout_only_in_training(tiny):
    apply_lora(tiny, LoraConfig(r=4, dropout=0.5))
    randomize_adapter(tiny)
    ids = tokens(tiny)
    tiny.train()
    assert not torch.equal(tiny(ids), tiny(ids))  # random masks
    tiny.eval()
    assert torch.equal(tiny(ids), tiny(ids))


def test_several_adapters_saved_loaded_and_switched(tiny, tmp_path):
    ids = tokens(tiny)
    with torch.no_grad():
        base = tiny(ids)
    add_adapter(tiny, LoraConfig(r=4, targets=("wq", "wv")), "math")
    randomize_adapter(tiny, "math", seed=5)
    add_adapter(tiny, LoraConfig(r=2, alpha=4, targets=("w1", "w2"), use_dora=True), "style")
    randomize_adapter(tiny, "style", seed=6)
    assert adapter_names(tiny) == ["math", "style"]
    with torch.no_grad():
        set_adapter(tiny, "math")
        out_math = tiny(ids)
        set_adapter(tiny, "style")
        out_style = tiny(ids)
        with disabled_adapters(tiny):
            torch.testing.assert_close(tiny(ids), base, atol=0, rtol=0)
        torch.testing.assert_close(tiny(ids), out_style, atol=0, rtol=0)  # restored after the block
    assert (out_math - out_style).abs().max() > 1e-3 and (out_math - base).abs().max() > 1e-3
    save_adapter(tiny, tmp_path / "math", "math")
    save_adapter(tiny, tmp_path / "style", "style")

    fresh = tiny_model("tiny-gqa")
    load_adapter(fresh, tmp_path / "style", "style")
    load_adapter(fresh, tmp_path / "math", "math")  # the last one loaded is active
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), out_math, atol=1e-6, rtol=0)
        set_adapter(fresh, "style")
        torch.testing.assert_close(fresh(ids), out_style, atol=1e-6, rtol=0)
    delete_adapter(fresh, "style")
    assert adapter_names(fresh) == ["math"]
    with pytest.raises(AdapterError, match="no adapter 'style'"):
        set_adapter(fresh, "style")


def test_merge_refuses_what_cannot_be_merged():
    model = tiny_model("tiny-mqa")  # tied head
    apply_lora(model, LoraConfig(r=2, targets=("wq", "output")))
    with pytest.raises(AdapterError, match="tied"):
        merge(model)
    model = tiny_model("tiny-gqa")
    add_adapter(model, LoraConfig(r=2), "a")
    add_adapter(model, LoraConfig(r=2), "b")
    merge(model)
    with pytest.raises(AdapterError, match="unmerge"):
        set_adapter(model, "a")
