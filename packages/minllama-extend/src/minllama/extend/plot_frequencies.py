"""The README's figure: how much each RoPE scaling method slows every channel pair down.

    python -m minllama.extend.plot_frequencies packages/minllama-extend/docs/rope_scaling.png
"""
from __future__ import annotations

import math
import sys

from .rope_scaling import METHODS, RopeScalingMethod, base_frequencies

THETA, HEAD_DIM, ORIGINAL, FACTOR = 10000.0, 128, 4096, 8.0  # a Llama 2 head, 4k -> 32k


def slowdowns(seq_len: int = int(FACTOR * ORIGINAL)) -> dict[str, list[float]]:
    """base inv_freq / scaled inv_freq for every pair and method (1 = unchanged, FACTOR = fully interpolated)."""
    plain = base_frequencies(THETA, HEAD_DIM)
    return {m: (plain / RopeScalingMethod(m, FACTOR, ORIGINAL).frequencies(THETA, HEAD_DIM, seq_len)).tolist()
            for m in METHODS}


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = base_frequencies(THETA, HEAD_DIM)
    turns = (ORIGINAL * plain / (2 * math.pi)).tolist()  # full turns of each pair within the original context
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.semilogy(turns, color="black")
    a.axhline(1, color="gray", ls=":")
    a.set(xlabel="channel pair i", ylabel="full turns in 4096 tokens", title="Plain RoPE: slow pairs never turn once")
    for method, s in slowdowns().items():
        label = "dynamic (at 32k tokens the NTK factor is 8*8-7 = 57)" if method == "dynamic" else method
        b.semilogy(s, label=label, ls="--" if method == "dynamic" else "-")
    b.set(xlabel="channel pair i", ylabel="slowdown (base / scaled frequency)",
          title=f"Scaling 4k -> 32k (factor {FACTOR:g}), head_dim {HEAD_DIM}")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)


if __name__ == "__main__":
    plot(sys.argv[1] if len(sys.argv) > 1 else "rope_scaling.png")
