"""Where a decode step's time goes: SmolLM2-135M-Instruct decoding at batch 1, profiled, grouped by kind of operation.

    uv run apps/profile_decode.py                      # the default dtype of this machine, 32 tokens
    uv run apps/profile_decode.py --dtype float32 --tokens 64

torch.profiler records every PyTorch operation of the decode steps (prefill is excluded) with its *self* CPU time
(the time inside that operation and not in the operations it calls), and the table sums them by kind: the
matrix products that read the weights, attention, the small element-wise operations (RMSNorm, RoPE, SwiGLU,
residual adds), the KV cache writes, and the rest. Milliseconds are per generated token. The part that is not in
any operation (Python, module calls, the profiler's own cost) is the gap between the step's wall time and the sum.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = [  # (kind, substrings of aten / mkldnn operator names), first match wins
    ("attention", ("attention", "softmax")),
    ("matrix products (the weights)", ("mm", "linear", "matmul", "mkldnn", "mv", "bmm", "dot")),
    ("KV cache writes", ("index_copy", "index_put", "copy_")),
    ("element-wise (norms, RoPE, SwiGLU, adds)", ("mul", "add", "rsqrt", "mean", "pow", "silu", "sub", "neg", "cat",
                                                  "stack", "to", "type_as", "view_as_", "unbind", "exp", "div")),
]


def kind_of(name: str) -> str:
    short = name.split("::")[-1]
    for kind, keys in KINDS:
        if any(key in short for key in keys):
            return kind
    return "other (views, argmax, indexing)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=32, help="decode steps profiled")
    args = p.parse_args()
    from minllama.core.cache import StaticKVCache
    from minllama.core.checkpoint import load_pretrained
    from minllama.core.dtypes import resolve_dtype

    dtype = resolve_dtype(args.dtype, "cpu")
    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype=dtype)
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        def decode(n: int, profiler=None) -> float:
            cache = StaticKVCache(model, 1, prompt.shape[1] + n + 1)
            logits = model(prompt, cache.reserve(prompt.shape[1]), cache=cache, last_only=True)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            if profiler is not None:
                profiler.start()  # after the prefill: only decode steps are recorded
            start = time.perf_counter()
            for _ in range(n):
                token = model(token, cache.reserve(1), cache=cache)[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
            if profiler is not None:
                profiler.stop()
            return elapsed

        decode(8)  # warm-up: the first call of each shape builds its kernels
        plain = decode(args.tokens)
        prof = profile(activities=[ProfilerActivity.CPU])
        profiled = decode(args.tokens, prof)
    per_kind, calls = defaultdict(float), defaultdict(int)
    for event in prof.key_averages():
        per_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3  # ms
        calls[kind_of(event.key)] += event.count
    step_ms = 1e3 * profiled / args.tokens  # the profiler adds its own cost per operation: shares of this step
    total = sum(per_kind.values()) / args.tokens
    print(f"smollm2-135m-instruct, {str(dtype).removeprefix('torch.')}, batch 1, {args.tokens} decode steps, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; a step takes "
          f"{1e3 * plain / args.tokens:.1f} ms ({args.tokens / plain:.1f} tok/s) unprofiled, {step_ms:.1f} ms profiled")
    print("| kind of operation | ms per token | share of the step | calls per token |\n|---|---|---|---|")
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        ms_token = ms / args.tokens
        print(f"| {kind} | {ms_token:.2f} | {100 * ms_token / step_ms:.0f}% | {calls[kind] / args.tokens:.0f} |")
    print(f"| outside any operation (Python, module calls) | {max(step_ms - total, 0):.2f} | "
          f"{100 * max(step_ms - total, 0) / step_ms:.0f}% | - |")


if __name__ == "__main__":
    main()
