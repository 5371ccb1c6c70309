"""Serving throughput and latency: the engine (continuous batching, paged cache, prefix caching) against static
batching with ``generate``, and speculative decoding against plain decoding, in one run, one table each.

    uv run apps/bench_serve.py                    # SmolLM2-135M-Instruct, fp32, concurrency 1, 4, 16, 64
    uv run apps/bench_serve.py --dtype bfloat16   # the default dtype of a CPU with bf16 arithmetic
    uv run apps/bench_serve.py --quick            # a smoke run: small counts, seconds to a minute

Workload: a fixed, seeded mix of prompt lengths (16-256 tokens) and answer lengths (8-96 tokens), greedy. At
concurrency c, c requests are in flight at any time (a closed loop: when one finishes, the next arrives). Static
batching takes the requests c at a time and runs ``generate`` on each batch (left padding; the batch ends with its
longest answer); transformers' ``generate`` does the same on the same weights, and its ``generate_batch``
(continuous batching) gets all requests at once (throughput only: it returns when all are done). Reported: output tokens/s over the whole run, time to first token (TTFT, p50/p99, from arrival)
and inter-token latency (ITL, mean gap between a request's tokens). The prefix-caching row puts a shared 500-token
system prompt before every request. Times are wall-clock on this machine: compare rows of the same run only; the
header says when the machine was busy (load average above its core count).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from minllama.core.checkpoint import load_pretrained
from minllama.core.engine import Engine, Request
from minllama.core.generate import generate_stream
from minllama.core.speculative import LookupDraft, ModelDraft, speculative_generate


def workload(n: int, vocab: int, seed: int, prefix: list[int] = (), scale: float = 1.0) -> list[tuple[list[int], int]]:
    """n (prompt, answer length) pairs: prompts of 16-256 tokens, answers of 8-96 (times ``scale``), seeded."""
    rng = random.Random(seed)
    lo, hi, a_lo, a_hi = (max(1, int(x * scale)) for x in (16, 256, 8, 96))
    return [(list(prefix) + [rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(a_lo, a_hi))
            for _ in range(n)]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def summary(name: str, c: int, n_tokens: int, wall: float, ttft: list[float], itl: list[float]) -> dict:
    return {"system": name, "concurrency": c, "tok_s": n_tokens / wall, "ttft_p50": percentile(ttft, 50),
            "ttft_p99": percentile(ttft, 99), "itl_ms": 1000 * statistics.fmean(itl) if itl else float("nan")}


def run_engine(model, jobs, c: int, prefix_caching: bool, name: str) -> dict:
    engine = Engine(model, block_size=16, max_batch=c, prefill_chunk=256, prefix_caching=prefix_caching,
                    kv_bytes=int(1.5 * 2**30))
    pending, live, ttft, itl, n_tokens = list(jobs), {}, [], [], 0
    start = time.perf_counter()
    while pending or not engine.idle:
        while pending and len(live) < c:
            prompt, n = pending.pop(0)
            r = engine.submit(Request(prompt, n))
            live[r.id] = (r, time.perf_counter(), [])
        for r, _ in engine.step():
            live[r.id][2].append(time.perf_counter())
        for rid in [rid for rid, (r, _, _) in live.items() if r.done]:
            r, arrived, times = live.pop(rid)
            n_tokens += len(times)
            ttft.append(times[0] - arrived)
            itl += [b - a for a, b in zip(times, times[1:])]
    return summary(name, c, n_tokens, time.perf_counter() - start, ttft, itl)


def run_static(model, jobs, c: int) -> dict:
    ttft, itl, n_tokens = [], [], 0
    start = time.perf_counter()
    for i in range(0, len(jobs), c):
        batch = jobs[i:i + c]
        arrived = time.perf_counter()
        budget = max(n for _, n in batch)
        times = []
        for _ in generate_stream(model, [p for p, _ in batch], budget):
            times.append(time.perf_counter())
        for _, n in batch:  # each row counts its own tokens; the batch ran to its longest answer
            n_tokens += n
            ttft.append(times[0] - arrived)
            itl += [b - a for a, b in zip(times[:n], times[1:n])]
    return summary("static batching (generate)", c, n_tokens, time.perf_counter() - start, ttft, itl)


def load_hf(dtype=torch.float32):
    """transformers' LlamaForCausalLM on the same GGUF weights (its own GGUF loader), eval."""
    from transformers import LlamaForCausalLM

    from minllama.core.checkpoint import default_model_path

    path = default_model_path()
    return LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=dtype).eval()


def run_hf_static(hf, jobs, c: int) -> dict:
    """transformers' generate, c requests at a time, left-padded (what a user of transformers would write)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # generate calls put() with the prompt first, then once per new token
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    ttft, itl, n_tokens = [], [], 0
    start = time.perf_counter()
    for i in range(0, len(jobs), c):
        batch = jobs[i:i + c]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])  # (c, width), left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        budget, clock, arrived = max(n for _, n in batch), Clock(), time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=budget, min_new_tokens=budget, do_sample=False,
                    pad_token_id=0, streamer=clock)
        for _, n in batch:
            n_tokens += n
            ttft.append(clock.times[0] - arrived)
            itl += [b - a for a, b in zip(clock.times[:n], clock.times[1:n])]
    return summary("transformers generate (static, padded)", c, n_tokens, time.perf_counter() - start, ttft, itl)


def run_hf_continuous(hf, jobs, c: int) -> dict:
    """transformers' own continuous batching (``generate_batch``), all requests at once, at most c in a batch.
    It returns only when all are done, so only throughput is comparable (no TTFT / ITL)."""
    from transformers import GenerationConfig

    budget = max(n for _, n in jobs)  # one config for all: each row is then counted for its own length only
    config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_batch_tokens=max(256, c * 16), num_blocks=4096, block_size=16)
    start = time.perf_counter()
    hf.generate_batch([p for p, _ in jobs], generation_config=config, warmup=False)
    wall = time.perf_counter() - start
    # it generated ``budget`` tokens for every request; count them all (its throughput, not the workload's)
    return summary("transformers generate_batch (continuous)", c, budget * len(jobs), wall, [], [])


def speculation(model, tokenizer, quick: bool) -> list[dict]:
    text = ("The committee met on Tuesday to review the budget. The committee approved the budget for the library "
            "and the budget for the park, and asked the city to publish the budget online. ") * 3
    prompt = tokenizer.encode(f"Repeat this text exactly:\n{text}\nRepeated text:\n")
    n = 12 if quick else 128
    rows = []

    def timed(label, fn):
        list(fn({}))  # warm-up: the first call of a shape builds its kernels (measured: 6 tok/s, then 33)
        start = time.perf_counter()
        stats = {}
        out = list(fn(stats))
        elapsed = time.perf_counter() - start
        rows.append({"decode": label, "tok_s": len(out) / elapsed,
                     "accepted": f"{stats['accepted']}/{stats['drafted']}" if stats.get("drafted") else "-",
                     "same": "-" if not rows else "yes" if out == rows[0]["out"] else "no", "out": out})
        return out

    timed("plain (generate_stream)", lambda s: (int(t[0]) for t in generate_stream(model, [prompt], n)))
    for label, draft in [("prompt lookup, k=4", LookupDraft()), ("prompt lookup, k=8", LookupDraft())]:
        k = int(label[-1])
        timed(label, lambda s: speculative_generate(model, prompt, n, draft, k=k, stats=s))
    if model.norm.weight.dtype != torch.float32:  # minllama-quant's CPU kernels take fp32 activations
        return rows
    try:
        from minllama.quant import quantize
        import copy

        small = quantize(copy.deepcopy(model), "int8")
        timed("int8 copy as the draft, k=4",
              lambda s: speculative_generate(model, prompt, n, ModelDraft(small), k=4, stats=s))
    except ImportError:
        pass
    return rows


def step_costs(model) -> str:
    """What bounds batching on this machine: one decode step at batch 1 and at batch 16 (static cache, 200 tokens of
    context, median of 20) and prefill speed (256 tokens), on the model as loaded."""
    from minllama.core.cache import StaticKVCache

    vocab, step = model.config.vocab_size, {}
    g = torch.Generator().manual_seed(0)
    for B in (1, 16):
        cache = StaticKVCache(model, B, 256)
        model(torch.randint(100, vocab, (B, 200), generator=g), cache.reserve(200), cache=cache, last_only=True)
        times = []
        for _ in range(25):
            start = time.perf_counter()
            model(torch.randint(100, vocab, (B, 1), generator=g), cache.reserve(1), cache=cache)
            times.append(time.perf_counter() - start)
        step[B] = statistics.median(times[5:])  # the first steps of a shape build their kernels
    prompt = torch.randint(100, vocab, (1, 256), generator=g)
    for _ in range(2):  # the second run is timed
        cache = StaticKVCache(model, 1, 256)
        start = time.perf_counter()
        model(prompt, cache.reserve(256), cache=cache, last_only=True)
        prefill = 256 / (time.perf_counter() - start)
    return (f"# one decode step: batch 1 {1000 * step[1]:.1f} ms, batch 16 {1000 * step[16]:.1f} ms "
            f"({step[16] / step[1]:.2f}x: batch 16 decodes at most {16 * step[1] / step[16]:.1f}x as fast as "
            f"batch 1); prefill {prefill:.0f} tok/s (256 tokens)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated concurrency levels")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--step-costs", action="store_true", help="print only the per-step costs that bound batching")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute of every system (fp32: each answer is exactly its one-at-a-time answer)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.quick:  # a smoke run: few short requests (the levels given, or 1 and 3)
        args.requests = 6
        levels = levels if args.concurrency != p.get_default("concurrency") else [1, 3]
    load = os.getloadavg()[0]
    busy = " -- the machine was BUSY (load average above the core count): compare rows, not runs" \
        if load > (os.cpu_count() or 1) else ""
    print(f"# {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load:.1f}{busy}")
    dtype = getattr(torch, args.dtype)
    print(f"# {args.dtype}")
    model, tokenizer = load_pretrained("smollm2-135m-instruct", dtype=dtype)
    vocab = model.config.vocab_size
    with torch.no_grad():
        print(step_costs(model), flush=True)
    if args.step_costs:
        return
    scale = 0.2 if args.quick else 1.0
    jobs = workload(args.requests, vocab, seed=0, scale=scale)
    system = [random.Random(1).randrange(100, vocab) for _ in range(64 if args.quick else 500)]
    shared = workload(args.requests, vocab, seed=0, prefix=system, scale=scale)
    rows, hf = [], None if args.no_hf else load_hf(dtype)
    with torch.no_grad():
        for c in levels:
            rows.append(run_engine(model, jobs, c, True, "engine"))
            rows.append(run_static(model, jobs, c))
            if hf is not None:
                rows.append(run_hf_static(hf, jobs, c))
                try:
                    rows.append(run_hf_continuous(hf, jobs, c))
                except Exception as e:  # noqa: BLE001 -- an API still marked experimental: say why it is absent
                    print(f"(transformers generate_batch skipped: {type(e).__name__}: {str(e)[:120]})")
            rows.append(run_engine(model, shared, c, False, f"engine, {len(system)}-token shared prompt, no cache"))
            rows.append(run_engine(model, shared, c, True, f"engine, {len(system)}-token shared prompt, cached"))
            print(f"... concurrency {c} done", flush=True)
        print("\n| system | concurrency | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL (ms) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['system']} | {r['concurrency']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | "
                  f"{r['ttft_p99']:.2f} | {r['itl_ms']:.1f} |", flush=True)
        spec = speculation(model, tokenizer, args.quick)
    print("\n| batch-1 decode | tok/s | speed-up | drafts kept | same tokens as plain |")
    print("|---|---|---|---|---|")
    for r in spec:
        print(f"| {r['decode']} | {r['tok_s']:.1f} | {r['tok_s'] / spec[0]['tok_s']:.2f}x | {r['accepted']} | "
              f"{r['same']} |")
    print(f"\n# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
