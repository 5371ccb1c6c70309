"""Fixtures of the minllama-peft tests; the helpers themselves are in peft_helpers.py."""
import pytest

from peft_helpers import tiny_model


@pytest.fixture
def tiny():
    return tiny_model("tiny-gqa")
