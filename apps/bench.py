"""Prefill and decode speed of MinimalLlama vs Hugging Face transformers and llama.cpp, on the same weights, in one run.

    uv run apps/bench.py                 # SmolLM2-135M-Instruct, every format, every mode, every implementation
    uv run apps/bench.py --dtypes float32 # fp32 only
    uv run apps/bench.py --no-compile    # eager only (compiling takes minutes on a small CPU)
    uv run apps/bench.py --no-compile --runs 1 --prompt-len 16 --new-tokens 4    # a smoke run
    uv run apps/bench.py --no-hf --baseline ../old-checkout   # before/after rows: another checkout (its own .venv)

MinimalLlama runs in three modes: eager (the model as written), cpu-decode (eager, with each one-token step's
decoder layers in C++: ``minllama.kernels.cpu_decode``, on CPUs with AVX-512) and compiled (``torch.compile``).
Besides fp32 and bf16, three quantized formats (``--dtypes``): minllama-quant's int8 and int4 (groups of 32, the head
in int8) and the shipped file's own Q4_1 blocks (on the C++ step, as chat.py runs them, with keys and values stored in
bf16, as llama.cpp stores F16 ones). llama.cpp runs on the same GGUF weights re-encoded to F32 (against
fp32), F16 (against bf16) and Q8_0 (against int8), and on the shipped Q4_1 file (against int4 and q4_1), when
``llama-cpp-python`` is installed; it builds from source, so it is not a dependency: ``apps/bench_llamacpp.py``
says how to install it, and its rows are skipped with a note when it is absent.

Both dtypes are measured because the best one depends on the CPU (``minllama.core.dtypes``: bf16 is the default
only where the hardware computes it); a last line shows what bf16 costs in accuracy (perplexity and the greedy
token against fp32, on the first tokens of the core README). Each measurement runs in its own process so that its
peak memory (max RSS on the CPU, max allocated on CUDA) is its own. Prefill: one forward over a --prompt-len token
prompt. Decode: batch 1, --new-tokens greedy tokens, timed from the first generated token to the last (so prefill
is not counted). Every configuration is measured --runs times, the implementations in turn; the comparison uses
each one's best run, and says when the machine looked busy (a load average above its number of cores).
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

# No pool of MKL's GEMM buffers, as in chat.py (why: there); each row's worker process inherits it.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

import torch  # noqa: E402 (after the line above)

from minllama.core.dtypes import DTYPES as CORE_DTYPES  # noqa: E402

MODEL = "smollm2-135m-instruct"
# the formats measured, as the table names them: fp32 and bf16 (core), and on an fp32 model minllama-quant's int8
# (one scale per output channel) and int4 (groups of 32, the head in int8), and q4_1: the shipped GGUF file's own
# Q4_1 blocks (minllama-quant's load_gguf_quantized; its embedding and head are Q8_0). transformers has no
# quantized rows.
SHORT = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8", "int4": "int4", "q4_1": "q4_1"}
LLAMA_CPP_FORMAT = {"float32": "F32", "bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_1", "q4_1": "Q4_1"}
FLOATS, QUANTIZED = ("float32", "bfloat16"), ("int8", "int4", "q4_1")
DTYPES = {name: CORE_DTYPES.get(name, torch.float32) for name in SHORT}  # the dtype each format loads in


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


def bench_ours(args, compile: bool, cpu_decode: bool = False) -> dict:
    from minllama.core.checkpoint import load_pretrained
    from minllama.core.cache import StaticKVCache
    from minllama.core.generate import generate_stream

    # `tokenizer` is not used, but kept alive to the end as a chat keeps it: its memory is part of the peak
    t0 = time.perf_counter()
    if args.dtype in ("int8", "int4"):  # each layer quantized as it is read: the fp32 model never exists whole
        from minllama.quant import load_pretrained_quantized
        options = dict(group_size=32, head="int8") if args.dtype == "int4" else {}
        model, tokenizer = load_pretrained_quantized(MODEL, args.dtype, DTYPES[args.dtype], args.device, **options)
    elif args.dtype == "q4_1":  # the file's blocks as they are
        from minllama.quant.gguf_model import load_gguf_quantized
        model, tokenizer = load_gguf_quantized(device=args.device)
    else:
        model, tokenizer = load_pretrained(MODEL, dtype=DTYPES[args.dtype], device=args.device)
    if cpu_decode:  # one-token steps through the C++ decoder layers (built on first use, then cached)
        from minllama.kernels.cpu_decode import cpu_decode_unsupported, use_cpu_decode
        if reason := cpu_decode_unsupported(model):
            raise RuntimeError(f"the C++ decode step cannot run here: {reason}")
        use_cpu_decode(model)
    if args.dtype in QUANTIZED:  # as chat.py
        from minllama.quant import prepare, set_path
        if cpu_decode:  # the C++ step reads the quantized buffers: no packed copy (long prompts dequantize each
            # matrix as they go, prompts of <= 16 tokens run in C++), and keys and values in bf16 (chat.py's
            # --kv-cache auto; llama.cpp's rows keep F16 ones)
            set_path(model, "fallback")
            model.kv_cache_dtype = torch.bfloat16
        else:  # PyTorch's packed low-bit kernels decode
            prepare(model)
    load_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)

    with torch.no_grad():
        cache = StaticKVCache(model, 1, args.prompt_len + args.new_tokens)
        pos = torch.arange(args.prompt_len, device=args.device)
        prefill_s = timed(lambda: model(prompt, pos, last_only=True, cache=cache), args.device)
        del cache  # generate_stream makes its own: a chat holds one cache, and so does the peak measured here

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
    """Decode tok/s if a step did nothing but read each weight matrix once: at the machine's read bandwidth
    (measured: the sum of a 1 GiB buffer, read twice), and at the rates at which F.linear and the C++ GEMV
    (``minllama.kernels.cpu_gemv``, where it runs) actually read the weights with one token."""
    from minllama.core.checkpoint import load_pretrained

    model, _ = load_pretrained(MODEL, dtype=DTYPES[args.dtype], device=args.device, with_tokenizer=False)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    x = {w.shape[1]: torch.randn(1, w.shape[1], device=args.device, dtype=w.dtype) for w in weights}
    buffer = torch.ones(2**28, device=args.device)  # 1 GiB of fp32, larger than any cache
    out = dict(gb=gb, machine_gb_s=2**30 / 1e9 / timed(lambda: buffer.sum(), args.device, repeat=5))
    del buffer
    with torch.no_grad():
        out["linear_gb_s"] = gb / timed(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in weights],
                                        args.device, repeat=5)
        if args.device == "cpu":
            from minllama.kernels.cpu_gemv import cpu_gemv_supported, gemv
            if cpu_gemv_supported() is None:
                x32 = {k: v[0].float() for k, v in x.items()}
                out["gemv_gb_s"] = gb / timed(lambda: [gemv(x32[w.shape[1]], w) for w in weights], args.device, 5)
    return out


def bf16_cost(args) -> dict:
    """What computing in bf16 costs against fp32 on real text (the first --cost-tokens tokens of the core README):
    perplexity in each dtype, how often the two agree on the most likely next token, the largest logit gap."""
    from pathlib import Path

    from minllama.core.checkpoint import load_pretrained

    readme = Path(__file__).resolve().parents[1] / "packages" / "minllama-core" / "README.md"
    logits, tokens = {}, None
    for name in ("float32", "bfloat16"):
        model, tokenizer = load_pretrained(MODEL, dtype=DTYPES[name], device=args.device)
        if tokens is None:
            tokens = torch.tensor([tokenizer.encode(readme.read_text())[:args.cost_tokens]], device=args.device)
        with torch.no_grad():
            logits[name] = model(tokens)[0].float()  # (T, vocab)
        del model
    target = tokens[0, 1:]
    ppl = {name: torch.nn.functional.cross_entropy(x[:-1], target).exp().item() for name, x in logits.items()}
    a, b = logits["float32"], logits["bfloat16"]
    return dict(tokens=tokens.shape[1], ppl_fp32=ppl["float32"], ppl_bf16=ppl["bfloat16"],
                top1_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                max_logit_gap=(a - b).abs().max().item())


def bench_hf(args, compile: bool) -> dict:
    from transformers import LlamaForCausalLM

    from minllama.core.checkpoint import default_model_path

    path = default_model_path()
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=DTYPES[args.dtype]).to(args.device).eval()
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
    try:
        if mode in ("bound", "cost"):
            result = bandwidth_bound(args) if mode == "bound" else bf16_cost(args)
        elif impl == "llama.cpp":
            from bench_llamacpp import bench_llama_cpp
            result = bench_llama_cpp(mode, args.prompt_len, args.new_tokens, torch.get_num_threads())
        elif impl == "minllama":
            result = bench_ours(args, compile=mode == "compiled", cpu_decode=mode == "cpu-decode")
        else:
            result = bench_hf(args, compile=mode == "compiled")
        result["peak_mb"] = peak_memory_mb(args.device)
    except Exception as e:  # report and go on with the other measurements
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    print("RESULT " + json.dumps(result))


def run_worker(args, what: str, dtype: str = "float32", checkout: str | None = None) -> dict:
    """Run one measurement in a fresh process (so its peak memory is its own) and return its result; ``checkout``:
    in another checkout of this repository, with its own .venv (the code before a change)."""
    python, script = sys.executable, __file__
    if checkout:
        python, script = os.path.join(checkout, ".venv", "bin", "python"), os.path.join(checkout, "apps", "bench.py")
    cmd = [python, script, "--worker", what, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--device", args.device, "--dtype", dtype,
           "--cost-tokens", str(args.cost_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:120]}


def best(rows: list[dict], key: str) -> float | None:
    """The best (highest) value of ``key`` over the runs that succeeded: on a shared machine, other processes only
    ever slow a run down, so the fastest run is the one that was disturbed least."""
    values = [r[key] for r in rows if key in r]
    return max(values) if values else None


def conclusion(results: dict, mode: str, other: str = "transformers", label: str = "transformers",
               their_mode: str | None = None) -> str | None:
    """The comparison line of one mode, from the best of each implementation's runs, with the spread of the ratio
    over the runs (run i of one implementation against run i of the other: the two ran at about the same time).
    ``their_mode``: the other implementation's mode, when it is not the same (llama.cpp's formats)."""
    ours, theirs = results.get(("minllama", mode), []), results.get((other, their_mode or mode), [])
    if best(ours, "decode_tok_s") is None or best(theirs, "decode_tok_s") is None:
        return None
    decode = best(ours, "decode_tok_s") / best(theirs, "decode_tok_s")
    prefill = best(ours, "prefill_tok_s") / best(theirs, "prefill_tok_s")
    line = f"{mode}: MinimalLlama decodes {decode:.2f}x and prefills {prefill:.2f}x as fast as {label}"
    paired = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(ours, theirs)
              if "decode_tok_s" in a and "decode_tok_s" in b]
    n = max(len(ours), len(theirs))
    if len(paired) > 1:
        line += (f" (best of {n} runs each; decode ratio per run {min(paired):.2f}-{max(paired):.2f}, "
                 f"median {statistics.median(paired):.2f})")
    return line + (" (one run each: pass --runs 3 for a steadier figure)" if n == 1 else "")


def busy_note(loads: list[float], cores: int) -> str | None:
    """A warning when the 1-minute load average exceeded the number of cores at any check: other processes then
    compete for the CPU, and every figure is low and noisy (the ratios less so: both sides suffer)."""
    if max(loads) <= cores:
        return None
    return (f"warning: the machine looked busy (load average {', '.join(f'{x:.1f}' for x in loads)} during the "
            f"runs, on {cores} cores): the figures are low and noisy; the comparison uses each side's best run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=512, help="tokens of the (random) prompt that prefill reads")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated in the decode measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where both models run: cpu, cuda, cuda:1 ...")
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help=f"comma-separated weight formats to measure, of {', '.join(DTYPES)} (int8 and int4: "
                        "minllama-quant's weights on an fp32 model, against llama.cpp's Q8_0 and Q4_1; q4_1: the "
                        "shipped GGUF file's own blocks, against llama.cpp on the same file)")
    p.add_argument("--runs", type=int, default=3,
                   help="measure each configuration this many times (fresh processes, the implementations in "
                        "turn); the comparison uses each one's best run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (see apps/bench_llamacpp.py)")
    p.add_argument("--cost-tokens", type=int, default=1024,
                   help="tokens of text on which bf16's accuracy is compared with fp32's (0: skip)")
    p.add_argument("--baseline", help="another checkout of this repository (with its .venv): its MinimalLlama is "
                                      "measured in the same run, interleaved, as rows 'minllama@baseline'")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help=argparse.SUPPRESS)  # a worker's
    args = p.parse_args()
    if args.worker:
        return worker(args)
    dtypes = args.dtypes.split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"--dtypes: unknown {', '.join(unknown)}; use {', '.join(DTYPES)}")

    from minllama.core.dtypes import cpu_flags, default_dtype

    from bench_llamacpp import gguf_file, llama_cpp_missing
    from minllama.kernels.cpu_gemv import cpu_gemv_supported

    kinds = ["eager"] + (["cpu-decode"] if args.device == "cpu" else []) + ([] if args.no_compile else ["compiled"])
    notes = []
    if "cpu-decode" in kinds and (reason := cpu_gemv_supported()):
        kinds.remove("cpu-decode")
        notes.append(f"no cpu-decode rows (the C++ decode step, minllama.kernels.cpu_decode): {reason}")
    llama_cpp = {d: LLAMA_CPP_FORMAT[d] for d in dtypes} if args.device == "cpu" and not args.no_llama_cpp else {}
    if llama_cpp and (reason := llama_cpp_missing()):
        llama_cpp = {}
        notes.append(f"no llama.cpp rows: {reason}")
    for fmt in llama_cpp.values():
        gguf_file(fmt)  # re-encoded once, before any timing
    configs = []  # (implementation, mode, dtype), in the order they run
    for d in dtypes:
        for kind in kinds:
            configs += [("minllama", f"{kind} {SHORT[d]}", d)]
            if args.baseline and kind != "cpu-decode":  # a baseline checkout may not have the C++ decode step
                configs += [("minllama@baseline", f"{kind} {SHORT[d]}", d)]
            if kind != "cpu-decode" and not args.no_hf and d in FLOATS:
                configs += [("transformers", f"{kind} {SHORT[d]}", d)]
        if d in llama_cpp and ("llama.cpp", f"gguf {llama_cpp[d]}") not in [c[:2] for c in configs]:
            configs += [("llama.cpp", f"gguf {llama_cpp[d]}", d)]  # (int4 and q4_1 share llama.cpp's Q4_1 row)
    modes = list(dict.fromkeys(mode for _, mode, _ in configs))
    loads, cores = [os.getloadavg()[0]], os.cpu_count() or 1
    print(f"{MODEL}, {'/'.join(SHORT[d] for d in dtypes)}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prefill {args.prompt_len} tokens, decode {args.new_tokens} tokens at "
          f"batch 1; {args.runs} run(s) each; load average {loads[0]:.1f} on {cores} cores")
    if args.device == "cpu":
        bf16 = sorted({"avx512_bf16", "amx_bf16"} & (cpu_flags() or set()))
        print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, bf16 arithmetic: {', '.join(bf16) or 'none'}; "
              f"the default dtype here (dtype 'auto'): {str(default_dtype('cpu')).removeprefix('torch.')}")
    print("\n".join(notes + ["modes: eager = the model as written; cpu-decode = eager with one-token steps in C++ "
                              "(minllama.kernels.cpu_decode); compiled = torch.compile'd decode step; gguf = "
                              "llama.cpp on the model re-encoded to that format"] * bool(configs)))
    header = f"{'implementation':<17} {'mode':<16} {'run':>3} {'load s':>7} {'prefill tok/s':>14} " \
             f"{'decode tok/s':>13} {'peak MB':>8} {'warm-up s':>9}"
    print(header + "\n" + "-" * len(header))
    results: dict = {(impl, mode): [] for impl, mode, _ in configs}
    for run in range(1, max(args.runs, 1) + 1):
        for impl, mode, dtype in configs:
            checkout = args.baseline if impl.endswith("@baseline") else None
            kind = mode.split()[1] if impl == "llama.cpp" else mode.split()[0]
            r = run_worker(args, f"{impl.removesuffix('@baseline')}:{kind}", dtype, checkout)
            results[impl, mode].append(r)
            if "error" in r:
                print(f"{impl:<17} {mode:<16} {run:>3} failed: {r['error']}")
            else:
                print(f"{impl:<17} {mode:<16} {run:>3} {r['load_s']:>7.1f} {r['prefill_tok_s']:>14.0f} "
                      f"{r['decode_tok_s']:>13.1f} {r['peak_mb']:>8.0f} {r['warmup_s']:>9.1f}", flush=True)
        loads.append(os.getloadavg()[0])
    for dtype in (d for d in dtypes if d in FLOATS):
        b = run_worker(args, "minllama:bound", dtype)
        if "error" not in b:
            rates = [("the machine's read bandwidth", b["machine_gb_s"]), ("F.linear's", b["linear_gb_s"])]
            rates += [("the C++ GEMV's", b["gemv_gb_s"])] if "gemv_gb_s" in b else []
            bounds = "; ".join(f"at {what} {rate:.1f} GB/s -> at most {rate / b['gb']:.1f} tok/s"
                               for what, rate in rates)
            print(f"memory-bandwidth bound, {SHORT[dtype]}: {b['gb']:.2f} GB of weight matrices read once per token; "
                  f"{bounds}")
    for mode in modes:
        if mode.startswith("gguf"):
            continue
        dtype = next(d for d in dtypes if mode.endswith(SHORT[d]))
        for other, label in (("minllama@baseline", "the baseline checkout"), ("transformers", "transformers")):
            their_mode = f"eager {SHORT[dtype]}" if mode.startswith("cpu-decode") else mode  # theirs has no C++ step
            if line := conclusion(results, mode, other, label + " eager" * (their_mode != mode), their_mode):
                print(line)
        if dtype in llama_cpp and (line := conclusion(results, mode, "llama.cpp", f"llama.cpp {llama_cpp[dtype]}",
                                                      their_mode=f"gguf {llama_cpp[dtype]}")):
            print(line)
    if {"float32", "bfloat16"} <= set(dtypes):
        for kind in ("eager", "cpu-decode", "compiled"):
            fp32, bf16 = results.get(("minllama", f"{kind} fp32"), []), results.get(("minllama", f"{kind} bf16"), [])
            if best(fp32, "decode_tok_s") and best(bf16, "decode_tok_s"):
                decode, prefill = (best(bf16, key) / best(fp32, key) for key in ("decode_tok_s", "prefill_tok_s"))
                print(f"{kind}: MinimalLlama in bf16 decodes {decode:.2f}x and prefills {prefill:.2f}x as fast as in "
                      "fp32")
    if args.cost_tokens > 0 and {"float32", "bfloat16"} <= set(dtypes):
        cost = run_worker(args, "minllama:cost")
        if "error" in cost:
            print(f"bf16's accuracy cost: failed: {cost['error']}")
        else:
            print(f"bf16's accuracy cost on {cost['tokens']} tokens of text: perplexity {cost['ppl_bf16']:.3f} vs "
                  f"{cost['ppl_fp32']:.3f} in fp32 ({100 * (cost['ppl_bf16'] / cost['ppl_fp32'] - 1):+.2f}%), the "
                  f"most likely next token the same at {100 * cost['top1_agree']:.1f}% of positions, largest logit "
                  f"gap {cost['max_logit_gap']:.3f}")
    if note := busy_note(loads, cores):
        print(note)


if __name__ == "__main__":
    main()
