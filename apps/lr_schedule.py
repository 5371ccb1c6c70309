"""The learning-rate schedule the training apps share: a short linear warmup, then a cosine decay.

Warmup keeps the first steps small while Adam's moment estimates are still noise; the cosine decay lets the weights
settle at the end. Ending at 10% of the peak instead of 0 keeps the last steps useful.
"""
import math


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over the first 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


if __name__ == "__main__":  # a module, not a program: running it (with --help or anything) says what it is
    print(__doc__.strip())
    print("\nImported by apps/modified_attention.py and apps/numeric_llama.py: `from lr_schedule import lr_at`.")
    print("lr_at(step, total=400, peak=2e-3), at a few steps:")
    for step in (0, 9, 19, 20, 100, 200, 300, 399):
        print(f"  step {step:3d}: {lr_at(step, 400, 2e-3):.2e}")
