"""Whole-model quantization: logits close to fp32, save/load round trips, clear errors, the adapter protocol."""
import json

import pytest
import torch
import torch.nn as nn

from minllama.core.generate import generate
from minllama.quant import (NF4Linear, QuantEmbedding, QuantizationError, load_quantized, model_bytes, quantize,
                            quantized_modules, save_quantized, set_path)
from quant_helpers import ALL_SCHEMES, tiny_model

EIGHT_BIT = {"int8", "fp8", "q8_0"}


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mqa"])  # untied and tied heads
@pytest.mark.parametrize("scheme,opts", ALL_SCHEMES)
def test_logits_close_to_fp32(name, scheme, opts):
    model = tiny_model(name)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tokens = torch.randint(0, 256, (2, 16))
    ref = model(tokens)
    quantize(model, scheme, **opts)
    set_path(model, "fallback")  # the numbers themselves; test_quant_kernels covers the fast paths
    out = model(tokens)
    # The tolerance comes from the weights: each layer's relative error, compounded over the layers it crosses.
    worst = max(((m.dequantize() - weights[n]).norm() / weights[n].norm()).item()
                for n, m in quantized_modules(model).items())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2.5 * worst
    assert rel < (0.04 if scheme in EIGHT_BIT else 0.25)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > (0.9 if scheme in EIGHT_BIT else 0.6)


def test_tied_embedding_is_stored_once_and_looks_up_head_rows():
    model = tiny_model("tiny-mqa")
    fp32_bytes = model_bytes(model)
    quantize(model, "int8")
    assert isinstance(model.tok_embeddings, QuantEmbedding)
    assert "tok_embeddings" not in "".join(model.state_dict())
    tokens = torch.tensor([[3, 7, 3]])
    torch.testing.assert_close(model.tok_embeddings(tokens)[0], model.output.dequantize()[tokens[0]])
    assert model_bytes(model) < 0.35 * fp32_bytes


def test_generation_with_kv_cache_matches_plain_passes():
    model = quantize(tiny_model("tiny-mqa"), "q4_1")
    prompt = [5, 9, 12, 1]
    out = generate(model, [prompt], 6)[0]
    seq = list(prompt)
    for _ in range(6):  # greedy by full passes, no cache: the same tokens
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


@pytest.mark.parametrize("scheme,opts", ALL_SCHEMES)
def test_save_load_round_trip(tmp_path, scheme, opts):
    model = quantize(tiny_model("tiny-mqa"), scheme, **opts)
    tokens = torch.randint(0, 256, (1, 12))
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", scheme=scheme, **opts)
    assert torch.equal(loaded(tokens), model(tokens))
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["quantization"] == {"scheme": scheme, **model.quant_config}


def test_wrong_scheme_or_group_size_is_refused(tmp_path):
    save_quantized(quantize(tiny_model(), "int4", group_size=32), tmp_path / "q")
    with pytest.raises(QuantizationError, match=r"holds a 'int4' model, not 'int8'"):
        load_quantized(tmp_path / "q", scheme="int8")
    with pytest.raises(QuantizationError, match=r"group_size=32, not group_size=128"):
        load_quantized(tmp_path / "q", scheme="int4", group_size=128)
    with pytest.raises(QuantizationError, match="has no option 'double_quant'"):
        load_quantized(tmp_path / "q", double_quant=True)
    load_quantized(tmp_path / "q", scheme="int4", group_size=32)  # the right expectation loads


def test_bad_requests_get_clear_errors(tmp_path):
    with pytest.raises(QuantizationError, match="unknown scheme 'int3'"):
        quantize(tiny_model(), "int3")
    with pytest.raises(QuantizationError, match="no option"):
        quantize(tiny_model(), "int8", group_size=32)
    with pytest.raises(ValueError, match="group_size must be"):
        quantize(tiny_model(), "int4", group_size=48)
    model = quantize(tiny_model(), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, "int4")
    with pytest.raises(QuantizationError, match="not quantized"):
        save_quantized(tiny_model(), tmp_path / "x")
    with pytest.raises(QuantizationError, match="no quant.json"):
        load_quantized(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails midway leaves the previous checkpoint untouched and no temporary directory behind."""
    target = tmp_path / "q"
    save_quantized(quantize(tiny_model(), "int8"), target)
    before = (target / "model.safetensors").read_bytes()

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("minllama.quant.model.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantize(tiny_model(seed=1), "int8"), target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


class LoRAOnQuantized(nn.Module):
    """A minimal LoRA over any module that follows the dequantized-weight protocol (as minllama-peft's would)."""

    def __init__(self, base, rank=4, alpha=8.0):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_adapter_on_nf4(double_quant):
    """QLoRA: frozen NF4 base (no gradient, no parameters), trainable low-rank update on top."""
    base = NF4Linear.from_weight(torch.randn(24, 64) * 0.05, double_quant=double_quant)
    assert list(base.parameters()) == [] and base.weight.shape == (24, 64) and not base.weight.requires_grad
    lora = LoRAOnQuantized(base)
    x = torch.randn(5, 64)
    torch.testing.assert_close(lora(x), x @ base.weight.T)  # B = 0: starts as the base
    target = torch.randn(5, 24)
    opt = torch.optim.SGD(lora.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        loss = (lora(x) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    # merging the update into the dequantized weight gives the adapter's function
    merged = base.weight + lora.B.detach() @ lora.A.detach() * lora.scale
    torch.testing.assert_close(lora(x), x @ merged.T, rtol=1e-4, atol=1e-5)


def test_bf16_model_computes_in_bf16():
    model = quantize(tiny_model("tiny-mqa"), "int4", group_size=32).to(torch.bfloat16)
    out = model(torch.randint(0, 256, (1, 4)))
    assert out.dtype == torch.bfloat16 and model.output.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme,opts", [("int8", {}), ("int4", {"group_size": 32}), ("q4_1", {})])
def test_gradients_flow_through_kernel_backed_modules(scheme, opts):
    """An adapter training on top needs d(loss)/dx; the kernels have no backward, so the fallback takes over."""
    model = quantize(tiny_model(), scheme, **opts)
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(2, 64, requires_grad=True)  # 2 rows: the kernel's size
    layer(x).pow(2).sum().backward()
    want = 2 * (x.detach() @ layer.weight.T) @ layer.weight
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-5)


def test_head_scheme_quantizes_only_the_output_head(tmp_path):
    """head="int8" on an int4 model: the head (and the tied embedding that reads it) is int8, every other layer
    int4; the head's own error shrinks to int8's; the checkpoint remembers the choice and checks it on load."""
    model = tiny_model("tiny-mqa")  # tied embedding
    w_head = model.output.weight.detach().clone()
    quantize(model, "int4", group_size=32, head="int8")
    kinds = {name: type(m).__name__ for name, m in quantized_modules(model).items()}
    assert kinds.pop("output") == "Int8Linear" and set(kinds.values()) == {"Int4Linear"}
    assert isinstance(model.tok_embeddings, QuantEmbedding) and model.tok_embeddings.head is model.output
    head_err = (model.output.dequantize() - w_head).abs().max()
    assert head_err <= model.output.scales.max() / 2 + 1e-6  # int8: half a step of its per-row scale
    assert model.quant_config == {"scheme": "int4", "group_size": 32, "head": "int8"}

    tokens = torch.randint(0, 256, (1, 8))
    save_quantized(model, tmp_path / "q")
    again = load_quantized(tmp_path / "q", scheme="int4", group_size=32, head="int8")
    assert torch.equal(again(tokens), model(tokens))
    with pytest.raises(QuantizationError, match=r"head='int8', not head=None"):
        load_quantized(tmp_path / "q", head=None)
    save_quantized(quantize(tiny_model(), "int4", group_size=32), tmp_path / "plain")
    with pytest.raises(QuantizationError, match=r"head=None, not head='int8'"):
        load_quantized(tmp_path / "plain", head="int8")
    with pytest.raises(QuantizationError, match="unknown scheme 'int2'"):
        quantize(tiny_model(), "int4", head="int2")
