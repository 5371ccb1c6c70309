"""Decode speed of SmolLM2-135M-Instruct on the CPU: PyTorch's layers, the C++ GEMV in them, whole C++ layers.

    uv run apps/bench_gemv.py                              # 64 greedy tokens, 5 runs of each column, alternating
    uv run apps/bench_gemv.py --runs 1 --new-tokens 4      # a smoke run

Batch 1, eager, fp32 and bf16. Three ways to run the same model: core's PyTorch layers (``F.linear``); the same with
every ``nn.Linear`` of a one-token step through the C++ GEMV (``minllama.kernels.cpu_gemv.use_cpu_gemv``); and each
decoder layer of a one-token step as one C++ call (``minllama.kernels.cpu_decode.use_cpu_decode``). Each dtype's
model is loaded once and the swaps are put in and taken out between runs, so the columns alternate and a
neighbour's load hits them alike. Decode is timed from the first generated token to the last (prefill is not
counted); each column reports the median over --runs, and whether its greedy tokens equal F.linear's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

MODEL = "smollm2-135m-instruct"


def decode_tok_s(model, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from minllama.core.generate import generate_stream

    stream = generate_stream(model, [prompt], new_tokens)
    tokens = [int(next(stream)[0])]  # the first token comes from the prefill
    t0 = time.perf_counter()
    tokens += [int(t[0]) for t in stream]
    return (len(tokens) - 1) / (time.perf_counter() - t0), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    from minllama.core.checkpoint import load_pretrained
    from minllama.kernels.cpu_decode import remove_cpu_decode, use_cpu_decode
    from minllama.kernels.cpu_gemv import cpu_gemv_supported, remove_cpu_gemv, use_cpu_gemv

    if reason := cpu_gemv_supported():
        raise SystemExit(f"the CPU kernels cannot run here ({reason}): nothing to compare")
    swaps = {"F.linear": lambda m: remove_cpu_gemv(remove_cpu_decode(m)),
             "gemv": lambda m: use_cpu_gemv(remove_cpu_decode(m)),
             "layers": lambda m: use_cpu_decode(remove_cpu_gemv(m))}
    print(f"{MODEL}, batch 1, eager, {args.new_tokens} greedy tokens, {torch.get_num_threads()} threads, "
          f"median of {args.runs}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("| dtype | F.linear tok/s | C++ GEMV tok/s (same tokens) | C++ layers tok/s (same tokens) | "
          "layers / F.linear |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_pretrained(MODEL, dtype=dtype)
        prompt = tokenizer.encode("The capital of France is")
        rates = {name: [] for name in swaps}
        outputs = {}
        with torch.no_grad():
            for name in rates:  # warm-up (the first swap builds or loads the extension)
                decode_tok_s(swaps[name](model), prompt, 4)
            for _ in range(args.runs):
                for name in rates:
                    rate, outputs[name] = decode_tok_s(swaps[name](model), prompt, args.new_tokens)
                    rates[name].append(rate)
        med = {name: statistics.median(r) for name, r in rates.items()}
        same = {name: outputs[name] == outputs["F.linear"] for name in rates}
        print(f"| {str(dtype).removeprefix('torch.')} | {med['F.linear']:.1f} | {med['gemv']:.1f} ({same['gemv']}) | "
              f"{med['layers']:.1f} ({same['layers']}) | {med['layers'] / med['F.linear']:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
