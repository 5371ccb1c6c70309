"""Size, load time, speed and perplexity of SmolLM2-135M-Instruct in fp32, bf16 and every quantization scheme.

    uv run apps/bench_quant.py                    # everything, one table (10-20 minutes on a 2-core CPU)
    uv run apps/bench_quant.py --only fp32 int8   # some rows (--no-compile, --no-ppl: fewer columns)
    uv run apps/bench_quant.py --threads 1        # on a shared machine: one thread avoids OpenMP spin contention

Rows: fp32 and bf16 (core's load_pretrained), each ``quantize`` scheme applied to the fp32 model, and "gguf" (the
file's own Q4_1/Q8_0 blocks, ``load_gguf_quantized``). Columns: stored weight bytes; load s (from disk to ready:
save_quantized checkpoint for schemes, the GGUF file for fp32/bf16/gguf; kernel layouts built); prefill tok/s (one
--prompt-len pass); decode tok/s (batch 1, greedy, best of three runs of --new-tokens, prefill excluded), eager and
with ``generate(compile=True)`` (the compile itself is not timed); perplexity on the package's held-out text. The
load average is printed: the machine may be shared.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch

from minllama.core.cache import StaticKVCache
from minllama.core.checkpoint import load_pretrained
from minllama.core.generate import generate_stream
from minllama.quant import load_gguf_quantized, load_quantized, model_bytes, prepare, quantize, save_quantized
from minllama.quant.perplexity import heldout_text, perplexity

# a CUDA build of torch on a machine without CUDA logs "No CUDA runtime is found, using CUDA_HOME=..." when it first
# compiles (Inductor compiles C++ for the CPU, which needs no CUDA): harmless, so it is silenced, as in chat.py
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

MODEL = "smollm2-135m-instruct"
ROWS = {  # name -> how to build it: ("float", dtype) | ("scheme", scheme, options) | ("gguf",)
    "fp32": ("float", torch.float32), "bf16": ("float", torch.bfloat16),
    "int8": ("scheme", "int8", {}), "fp8": ("scheme", "fp8", {}),
    "int4-g32": ("scheme", "int4", {"group_size": 32}), "int4-g64": ("scheme", "int4", {"group_size": 64}),
    "int4-g128": ("scheme", "int4", {"group_size": 128}),
    "int4-g32-head8": ("scheme", "int4", {"group_size": 32, "head": "int8"}),  # the output head at 8 bits
    "nf4": ("scheme", "nf4", {}), "nf4-dq": ("scheme", "nf4", {"double_quant": True}),
    "q8_0": ("scheme", "q8_0", {}), "q4_0": ("scheme", "q4_0", {}), "q4_1": ("scheme", "q4_1", {}),
    "gguf": ("gguf",),
}


def build(row, workdir: str):
    """(model, load seconds)."""
    kind = ROWS[row]
    if kind[0] == "float":
        t0 = time.perf_counter()
        model, _ = load_pretrained(MODEL, dtype=kind[1], with_tokenizer=False)
        return model, time.perf_counter() - t0
    if kind[0] == "gguf":
        t0 = time.perf_counter()
        model, _ = load_gguf_quantized(with_tokenizer=False)
        prepare(model)
        return model, time.perf_counter() - t0
    model, _ = load_pretrained(MODEL, with_tokenizer=False)
    quantize(model, kind[1], **kind[2])
    path = os.path.join(workdir, row)
    save_quantized(model, path)
    del model
    t0 = time.perf_counter()
    model = load_quantized(path, scheme=kind[1], **kind[2])
    prepare(model)
    return model, time.perf_counter() - t0


@torch.no_grad()
def speed(model, prompt_len: int, new_tokens: int, compile_too: bool) -> tuple[float, float, float]:
    """(prefill tok/s, eager decode tok/s, compiled decode tok/s or nan)."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = StaticKVCache(model, 1, prompt_len + new_tokens)
    model(prompt, torch.arange(prompt_len), last_only=True, cache=cache)  # warm-up
    t0 = time.perf_counter()
    model(prompt, torch.arange(prompt_len), last_only=True, cache=cache)
    prefill = prompt_len / (time.perf_counter() - t0)

    def decode(compile: bool) -> float:
        stream = generate_stream(model, prompt.tolist(), new_tokens, compile=compile)
        next(stream)  # the first token comes from the prefill
        t0 = time.perf_counter()
        n = sum(1 for _ in stream)
        return n / (time.perf_counter() - t0)

    eager = max(decode(False) for _ in range(3))
    if not compile_too:
        return prefill, eager, float("nan")
    decode(True)  # compiles the decode step (seconds to a minute), not timed
    return prefill, eager, max(decode(True) for _ in range(3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-ppl", action="store_true", help="skip the perplexity column (the slowest part)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode column")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    tokens = None
    if not args.no_ppl:
        _, tokenizer = load_pretrained(MODEL, with_tokenizer=True)
        tokens = tokenizer.encode(heldout_text())
        print(f"held-out text: {len(tokens)} tokens")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for row in args.only:
            model, load_s = build(row, workdir)
            prefill, eager, compiled = speed(model, args.prompt_len, args.new_tokens, not args.no_compile)
            ppl = perplexity(model, tokens) if tokens is not None else float("nan")
            results[row] = (model_bytes(model) / 2**20, load_s, prefill, eager, compiled, ppl, os.getloadavg()[0])
            print(f"  {row:10s} done, load average {os.getloadavg()[0]:.2f}", flush=True)
            del model
    base = results.get("fp32")
    print("\n| scheme | MiB | load s | prefill tok/s | decode tok/s eager | compiled | vs fp32 eager "
          "| vs fp32 compiled | perplexity | vs fp32 | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, (mib, load_s, prefill, eager, compiled, ppl, load) in results.items():
        speedup = (f"{eager / base[3]:.2f}x / {compiled / base[3]:.2f}x", f"{compiled / base[4]:.2f}x") if base \
            else ("-", "-")
        dppl = f"{100 * (ppl / base[5] - 1):+.2f}%" if base and tokens is not None else "-"
        print(f"| {row} | {mib:.0f} | {load_s:.1f} | {prefill:.0f} | {eager:.1f} | {compiled:.1f} | {speedup[0]} "
              f"| {speedup[1]} | {'-' if tokens is None else f'{ppl:.3f}'} | {dppl} | {load:.1f} |")
    print("\nvs fp32 eager: (this row eager / fp32 eager) and (this row compiled / fp32 eager); vs fp32 compiled: "
          "both compiled.")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
