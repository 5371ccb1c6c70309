"""Decode speed of SmolLM2-135M-Instruct on the CPU with and without the C++ GEMV kernel, fp32 and bf16, in one run.

    uv run apps/bench_gemv.py                              # 64 greedy tokens, 5 runs of each row, alternating
    uv run apps/bench_gemv.py --runs 1 --new-tokens 4      # a smoke run

Batch 1, eager. Each dtype's model is loaded once; the swap (``minllama.kernels.cpu_gemv.use_cpu_gemv``) is put in
and taken out between runs, so the two rows alternate and a neighbour's load hits both alike. Decode is timed from
the first generated token to the last (prefill is not counted); each row reports the median over --runs.
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
    from minllama.kernels.cpu_gemv import cpu_gemv_supported, remove_cpu_gemv, use_cpu_gemv

    if reason := cpu_gemv_supported():
        raise SystemExit(f"the CPU GEMV kernel cannot run here ({reason}): nothing to compare")
    print(f"{MODEL}, batch 1, eager, {args.new_tokens} greedy tokens, {torch.get_num_threads()} threads, "
          f"median of {args.runs}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("| dtype | F.linear tok/s | C++ GEMV tok/s | speed-up | same tokens |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_pretrained(MODEL, dtype=dtype)
        prompt = tokenizer.encode("The capital of France is")
        rates = {"F.linear": [], "gemv": []}
        outputs = {}
        with torch.no_grad():
            for name in rates:  # warm-up (the first swap builds or loads the extension)
                (use_cpu_gemv if name == "gemv" else remove_cpu_gemv)(model)
                decode_tok_s(model, prompt, 4)
            for _ in range(args.runs):
                for name in rates:
                    (use_cpu_gemv if name == "gemv" else remove_cpu_gemv)(model)
                    rate, outputs[name] = decode_tok_s(model, prompt, args.new_tokens)
                    rates[name].append(rate)
        base, ours = statistics.median(rates["F.linear"]), statistics.median(rates["gemv"])
        print(f"| {str(dtype).removeprefix('torch.')} | {base:.1f} | {ours:.1f} | {ours / base:.2f}x | "
              f"{outputs['gemv'] == outputs['F.linear']} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
