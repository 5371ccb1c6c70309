"""Shared test helpers (imported by name: never `from conftest import`)."""
import torch

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama

# (scheme, options) pairs covering every module class and option
ALL_SCHEMES = [("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 64}),
               ("int4", {"group_size": 128}), ("nf4", {}), ("nf4", {"double_quant": True}), ("fp8", {}),
               ("q8_0", {}), ("q4_0", {}), ("q4_1", {})]


def tiny_model(name: str = "tiny-gqa", seed: int = 0) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name))
    model.init_weights()
    return model.eval()


def heavy_tailed_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few outliers, like a trained layer's (the case where group scales matter)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    outliers = torch.rand(rows, cols, generator=g) < 0.002
    return torch.where(outliers, w * 20, w)
