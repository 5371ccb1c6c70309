"""Fixtures of minllama-quant's tests (helpers live in quant_helpers.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_reader():
    """A gguf.GGUFReader over the embedded SmolLM2-135M-Instruct (memory-mapped: cheap)."""
    import gguf

    from minllama.core.checkpoint import default_model_path

    return gguf.GGUFReader(default_model_path())
