"""How close does each CPU GEMV reach the memory bandwidth? One token's linear layers of SmolLM2-135M, in one run.

    uv run packages/minllama-kernels/benchmarks/gemv_bandwidth.py              # the table
    uv run packages/minllama-kernels/benchmarks/gemv_bandwidth.py --reps 5     # a smoke run

Batch-1 decode multiplies a (1, K) activation by every (N, K) weight matrix once: 2 flops per weight read, so the
time is the time to stream the weights and GB/s = weight bytes / time is the figure of merit. The candidates run
alternately, rep after rep, so that a neighbour's load hits them all alike; each reports the median. Weights are
cycled over several copies, together twice the last-level cache (--working-set-mb), so that every rep reads its
weights from DRAM, as a decode step does (a whole model's weights do not fit in the cache).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N): q/o, k/v, gate/up, down, head


def candidates(x: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> zero-argument callable computing x @ w.T, each with its weight prepared once (as at load time)."""
    from minllama.kernels.cpu_gemv import cpu_gemv_usable, gemv
    w_t = w.t().contiguous()  # (K, N): the pre-transposed layout
    x32 = x.float()
    out = {
        "F.linear": lambda: F.linear(x, w),
        "matmul (K,N)": lambda: torch.matmul(x, w_t),
        "mv": lambda: torch.mv(w, x[0]),
        "mkldnn linear": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
    }
    if w.dtype == torch.float32:
        w_mk = w.to_mkldnn()
        out["mkldnn prepacked"] = lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), w_mk).to_dense()
    if cpu_gemv_usable():
        out["ours (C++ AVX-512)"] = lambda: gemv(x32[0], w)
    return out


def last_level_cache_mb() -> float:
    """Size of the L3 cache (Linux sysfs), or 256 MB when it cannot be read."""
    try:
        size = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()  # e.g. "491520K"
        return int(size.rstrip("KMG")) * {"K": 2**-10, "M": 1, "G": 2**10}[size[-1]]
    except (OSError, ValueError, KeyError):
        return 256.0


def measure(shape, dtype, reps: int, copies: int) -> dict:
    K, N = shape
    sets = []
    for i in range(copies):
        w = torch.randn(N, K).to(dtype)
        x = torch.randn(1, K).to(dtype)
        sets.append(candidates(x, w))
    names = list(sets[0])
    times = {n: [] for n in names}
    for fns in sets:  # warm-up: first calls allocate, pick kernels, fault pages in
        for fn in fns.values():
            fn()
    for r in range(reps):
        for n in names:
            fn = sets[r % copies][n]
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    nbytes = N * K * torch.empty((), dtype=dtype).element_size()
    return {n: nbytes / statistics.median(t) / 1e9 for n, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--working-set-mb", type=float, default=2 * last_level_cache_mb(),
                   help="weight copies per shape add up to this, so that each rep reads from DRAM")
    a = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, L3 {last_level_cache_mb():.0f} MB, "
          f"weight working set {a.working_set_mb:.0f} MB per shape")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            print(f"\nGB/s (weight bytes / median time), {str(dtype).removeprefix('torch.')}, {threads} threads")
            rows = []
            for K, N in SHAPES:
                mb = N * K * (4 if dtype == torch.float32 else 2) / 2**20
                copies = min(max(2, int(a.working_set_mb / mb) + 1), a.reps)  # more copies than reps are never read
                rows.append(((K, N), measure((K, N), dtype, a.reps, copies)))
            names = list(rows[0][1])
            print("| K -> N | " + " | ".join(names) + " |")
            print("|---" * (len(names) + 1) + "|")
            for (K, N), r in rows:
                print(f"| {K} -> {N} | " + " | ".join(f"{r[n]:.1f}" for n in names) + " |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
