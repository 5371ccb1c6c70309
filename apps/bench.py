"""Prefill and decode speed of MinimalLlama vs Hugging Face transformers, on the same weights, in one run.

    uv run apps/bench.py                 # SmolLM2-135M-Instruct, fp32, eager and compiled, both implementations
    uv run apps/bench.py --no-compile    # eager only (compiling takes minutes on a small CPU)
    uv run apps/bench.py --no-hf --baseline ../old-checkout   # before/after rows: another checkout (its own .venv)

Each measurement runs in its own process so that its peak memory (max RSS on the CPU, max allocated on CUDA) is
its own. Prefill: one forward over a --prompt-len token prompt. Decode: batch 1, --new-tokens greedy tokens, timed
from the first generated token to the last (so prefill is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MODEL = "smollm2-135m-instruct"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_ours(args, compile: bool) -> dict:
    from minllama.core.checkpoint import load_pretrained
    from minllama.core.cache import StaticKVCache
    from minllama.core.generate import generate_stream

    t0 = time.perf_counter()
    model, _ = load_pretrained(MODEL, dtype=torch.float32, device=args.device)
    load_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)

    with torch.no_grad():
        cache = StaticKVCache(model, 1, args.prompt_len + args.new_tokens)
        pos = torch.arange(args.prompt_len, device=args.device)
        prefill_s = timed(lambda: model(prompt, pos, last_only=True, cache=cache), args.device)

    def decode() -> float:
        stream = generate_stream(model, prompt.tolist(), args.new_tokens, compile=compile)
        next(stream)  # the first token comes from the prefill
        sync(args.device)
        t0 = time.perf_counter()
        n = sum(1 for _ in stream)
        sync(args.device)
        return n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    decode()  # warm-up (and compilation)
    warmup_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tok_s=args.prompt_len / prefill_s, decode_tok_s=max(decode(), decode()),
                warmup_s=warmup_s)


def bandwidth_bound(args) -> dict:
    """Decode tok/s if a step did nothing but read each weight matrix once (the matrix-vector products)."""
    from minllama.core.checkpoint import load_pretrained

    model, _ = load_pretrained(MODEL, dtype=torch.float32, device=args.device, with_tokenizer=False)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(1, w.shape[1], device=args.device) for w in weights}
    with torch.no_grad():
        step = timed(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights], args.device, repeat=5)
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    return dict(decode_tok_s=1 / step, gb=gb, gb_s=gb / step)


def bench_hf(args, compile: bool) -> dict:
    from transformers import LlamaForCausalLM

    from minllama.core.checkpoint import default_model_path

    path = default_model_path()
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).to(args.device).eval()
    load_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    if compile:
        gen["cache_implementation"] = "static"
        model.forward = torch.compile(model.forward, dynamic=False)

    with torch.no_grad():
        prefill_s = timed(lambda: model(prompt, logits_to_keep=1), args.device)

    def decode() -> float:  # generate() = prefill + (new_tokens - 1) decode steps; subtract the prefill
        with torch.no_grad():
            prefill = timed(lambda: model.generate(prompt, **{**gen, "max_new_tokens": 1, "min_new_tokens": 1}),
                            args.device, repeat=1)
            total = timed(lambda: model.generate(prompt, **gen), args.device, repeat=1)
        return (args.new_tokens - 1) / (total - prefill)

    t0 = time.perf_counter()
    decode()
    warmup_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tok_s=args.prompt_len / prefill_s, decode_tok_s=max(decode(), decode()),
                warmup_s=warmup_s)


def worker(args) -> None:
    impl, mode = args.worker.split(":")
    torch.manual_seed(0)
    fn = bench_ours if impl == "minllama" else bench_hf
    try:
        result = bandwidth_bound(args) if mode == "bound" else fn(args, compile=mode == "compiled")
        result["peak_mb"] = peak_memory_mb(args.device)
    except Exception as e:  # report and go on with the other measurements
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    print("RESULT " + json.dumps(result))


def run_worker(args, what: str, checkout: str | None = None) -> dict:
    """Run one measurement in a fresh process (so its peak memory is its own) and return its result; ``checkout``:
    in another checkout of this repository, with its own .venv (the code before a change)."""
    python, script = sys.executable, __file__
    if checkout:
        python, script = os.path.join(checkout, ".venv", "bin", "python"), os.path.join(checkout, "apps", "bench.py")
    cmd = [python, script, "--worker", what, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:120]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--baseline", help="another checkout of this repository (with its .venv): its MinimalLlama is "
                                      "measured in the same run, interleaved, as rows 'minllama@baseline'")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    impls = ["minllama"] + (["minllama@baseline"] if args.baseline else []) + ([] if args.no_hf else ["transformers"])
    runs = [(impl, mode) for mode in (["eager"] if args.no_compile else ["eager", "compiled"]) for impl in impls]
    load = os.getloadavg()[0]
    print(f"{MODEL}, fp32, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"prefill {args.prompt_len} tokens, decode {args.new_tokens} tokens at batch 1")
    if load > 0.5:
        print(f"warning: the machine was busy when the benchmark started (load average {load:.1f}): "
              f"figures may be low")
    header = f"{'implementation':<17} {'mode':<9} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} " \
             f"{'peak MB':>8} {'warm-up s':>9}"
    print(header + "\n" + "-" * len(header))
    results = {}
    for impl, mode in runs:
        baseline = impl.endswith("@baseline")
        results[impl, mode] = r = run_worker(args, f"{impl.removesuffix('@baseline')}:{mode}",
                                             args.baseline if baseline else None)
        if "error" in r:
            print(f"{impl:<17} {mode:<9} failed: {r['error']}")
        else:
            print(f"{impl:<17} {mode:<9} {r['load_s']:>7.1f} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
                  f"{r['peak_mb']:>8.0f} {r['warmup_s']:>9.1f}", flush=True)
    bound = run_worker(args, "minllama:bound")
    if "error" not in bound:
        print(f"memory-bandwidth bound: the {bound['gb']:.2f} GB of weight matrices read once per token at "
              f"{bound['gb_s']:.1f} GB/s -> at most {bound['decode_tok_s']:.1f} decode tok/s")
    for mode in ("eager", "compiled"):
        now, before = results.get(("minllama", mode), {}), results.get(("minllama@baseline", mode), {})
        if "decode_tok_s" in now and "decode_tok_s" in before:
            print(f"{mode}: this checkout decodes {now['decode_tok_s'] / before['decode_tok_s']:.2f}x and prefills "
                  f"{now['prefill_tok_s'] / before['prefill_tok_s']:.2f}x as fast as the baseline")
        ours, theirs = results.get(("minllama", mode), {}), results.get(("transformers", mode), {})
        if "decode_tok_s" in ours and "decode_tok_s" in theirs:
            print(f"{mode}: MinimalLlama decodes {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x and prefills "
                  f"{ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x as fast as transformers")


if __name__ == "__main__":
    main()
