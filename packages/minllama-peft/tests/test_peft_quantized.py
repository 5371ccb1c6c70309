"""QLoRA-readiness: adapters on a quantized Linear-like base (int8 + scales, no `weight`, only `dequantize()`)
compute exactly what the same adapters compute on a dense model holding the dequantized weights."""
import pytest
import torch
import torch.nn.functional as F

from minllama.peft import (AdapterError, LoraConfig, adapter_parameters, apply_lora, dense_weight, is_linear_like,
                           merge, merge_and_unload)
from minllama.peft.lora import lora_modules
from peft_helpers import FakeQuantLinear, dequantized_copy, quantize_linears, randomize_adapter, tiny_model, tokens

CFG = {"lora": LoraConfig(r=4, alpha=8, targets=("wq", "wv", "w1", "w2")),
       "dora": LoraConfig(r=4, alpha=8, targets=("wq", "wv", "w1", "w2"), use_dora=True)}


def test_the_protocol():
    q = FakeQuantLinear(torch.nn.Linear(8, 4, bias=False))
    assert not hasattr(q, "weight") and is_linear_like(q)
    assert dense_weight(q).shape == (4, 8)
    with pytest.raises(TypeError, match="not Linear-like"):
        dense_weight(torch.nn.ReLU())


@pytest.mark.parametrize("case", list(CFG))
def test_adapter_on_quantized_base_equals_dense_oracle(case):
    quant = quantize_linears(tiny_model("tiny-gqa"))
    dense = dequantized_copy(quant)
    for m in (quant, dense):
        torch.manual_seed(7)
        apply_lora(m, CFG[case])
        randomize_adapter(m)
    ids = tokens(quant)
    out_q, out_d = quant(ids), dense(ids)
    torch.testing.assert_close(out_q, out_d, atol=1e-5, rtol=1e-5)
    F.cross_entropy(out_q[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    F.cross_entropy(out_d[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for pq, pd in zip(adapter_parameters(quant), adapter_parameters(dense), strict=True):
        torch.testing.assert_close(pq.grad, pd.grad, atol=1e-5, rtol=1e-4)
    assert not any(b.requires_grad for b in quant.buffers())


def test_quantized_base_trains_and_unloads_to_dense():
    model = quantize_linears(tiny_model("tiny-gqa"))
    apply_lora(model, CFG["dora"])
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    ids = tokens(model, batch=4, length=24)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    losses = []
    for _ in range(10):
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    with pytest.raises(AdapterError, match="merge_and_unload"):
        merge(model)
    with torch.no_grad():
        adapted = model(ids)
        merge_and_unload(model)
        assert not list(lora_modules(model))
        assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
        torch.testing.assert_close(model(ids), adapted, atol=1e-5, rtol=1e-4)
