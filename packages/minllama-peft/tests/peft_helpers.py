"""Shared test helpers (a uniquely named module: every package has a conftest.py)."""
from __future__ import annotations

import torch
from torch import nn

from minllama.core import LlamaConfig, MinimalLlama, save_hf
from minllama.peft import LoraLinear, lora

HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
              "w2": "down_proj", "w3": "up_proj"}


def tiny_model(name: str = "tiny-gqa", seed: int = 0, **overrides) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    return model.eval()


def tokens(model: MinimalLlama, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def randomize_adapter(model: nn.Module, name: str = "default", seed: int = 2) -> None:
    """Give B (zero at init) and DoRA's magnitude random values, so that the adapter really changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for _, m in lora.lora_modules(model):
        if name in m.configs:
            m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * 0.05)
            if name in m.lora_magnitude:
                m.lora_magnitude[name].mul_(1 + 0.1 * torch.randn(m.lora_magnitude[name].shape, generator=g))


def hf_model(model: MinimalLlama, directory):
    """The same base weights in transformers' LlamaForCausalLM (through our save_hf)."""
    from transformers import LlamaForCausalLM

    save_hf(model, directory)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def hf_lora_config(cfg: lora.LoraConfig, **kw):
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                           use_dora=cfg.use_dora, target_modules=[HF_TARGETS[t] for t in cfg.targets], **kw)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in f".{n}"}


class FakeQuantLinear(nn.Module):
    """A test-only quantized Linear: int8 weights with one scale per output row, and no `weight` attribute at all.
    It follows minllama.peft's Linear-like protocol through `dequantize()`, like minllama-quant's modules would."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # (out, 1)
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantize())


def quantize_linears(model: MinimalLlama) -> MinimalLlama:
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "output" and not isinstance(m, LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FakeQuantLinear(m))
    return model


def dequantized_copy(model: MinimalLlama) -> MinimalLlama:
    """A dense model with the fake-quantized model's dequantized weights: the oracle for adapters on it."""
    import copy

    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, FakeQuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=False)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, lin)
    return dense
