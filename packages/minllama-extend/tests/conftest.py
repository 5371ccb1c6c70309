"""Fixtures of the extend tests; the helpers live in extend_helpers.py (import that, never conftest)."""
import pytest

from extend_helpers import tiny_model


@pytest.fixture
def tiny():
    return tiny_model("tiny-gqa")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads mostly contend with each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
