"""Perplexity on a fixed held-out text: the quality yardstick of every scheme.

``data/heldout.txt`` is an original short story written for this repository (Apache-2.0, like the package), so no
model has seen it in training. Perplexity = exp(mean negative log-likelihood of each next token): how many tokens
the model is, on average, hesitating between. A scheme "costs 1%" when its perplexity is 1% above fp32's.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"


def heldout_text() -> str:
    return HELDOUT.read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(model, tokens: list[int], window: int = 512) -> float:
    """exp(mean NLL) over ``tokens``, scored in independent windows of ``window`` tokens (each window predicts
    its tokens 2..window from the ones before it in the same window)."""
    total_nll, count = 0.0, 0
    device = model.rope.device
    for start in range(0, len(tokens) - 1, window):
        chunk = torch.tensor([tokens[start:start + window]], device=device)  # (1, T)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk)[0, :-1].float()  # (T-1, vocab)
        total_nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total_nll / count)
