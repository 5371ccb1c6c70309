"""Helpers shared by the core tests (a uniquely named module: every package has a conftest.py, so
`from conftest import ...` would be ambiguous when pytest collects several packages at once)."""
import torch

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama

TINY = ["tiny-mha", "tiny-gqa", "tiny-mqa", "tiny-llama3"]


def tiny_model(name: str = "tiny-gqa", seed: int = 0, **overrides) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    return model.eval()
