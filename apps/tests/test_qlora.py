"""QLoRA at the workspace level: a minllama-peft LoRA on a minllama-quant NF4 base (neither package imports the
other; the adapter only asks its base for `dequantize()`). The oracle is the same LoRA on a dense model whose
weights are the NF4 weights dequantized."""
import copy

import torch
import torch.nn.functional as F

from minllama.core import LlamaConfig, MinimalLlama
from minllama.peft import LoraConfig, adapter_parameters, apply_lora, mark_only_adapters_trainable
from minllama.quant import quantize

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def models():
    torch.manual_seed(0)
    base = MinimalLlama(LlamaConfig.from_name("tiny-gqa"))
    base.init_weights()
    qmodel = quantize(copy.deepcopy(base), "nf4", double_quant=True)
    dense = copy.deepcopy(base)  # the oracle: an ordinary model holding the NF4 weights, dequantized
    for name, module in qmodel.named_modules():
        if hasattr(module, "dequantize"):  # every quantized Linear, the output head included
            dense.get_submodule(name).weight.data.copy_(module.dequantize())
    for model in (qmodel, dense):
        torch.manual_seed(1)
        apply_lora(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
        mark_only_adapters_trainable(model)
        for p in adapter_parameters(model):  # B = 0 at init would hide the adapter: make it active
            torch.nn.init.normal_(p, std=0.05)
    return qmodel, dense


def test_lora_on_nf4_equals_lora_on_the_dequantized_weights():
    qmodel, dense = models()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (qmodel, dense):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for pq, pd in zip(adapter_parameters(qmodel), adapter_parameters(dense)):
        torch.testing.assert_close(pq.grad, pd.grad, rtol=1e-4, atol=1e-6)


def test_qlora_trains_while_the_nf4_base_stays_bit_identical():
    qmodel, _ = models()
    frozen = {k: v.clone() for k, v in qmodel.state_dict().items() if "lora" not in k}
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(adapter_parameters(qmodel), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(qmodel(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = qmodel.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
