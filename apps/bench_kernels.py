"""Triton kernels (minllama-kernels) vs PyTorch eager vs torch.compile, on a CUDA GPU, in one run.

    uv run apps/bench_kernels.py                    # every kernel at Llama-3-8B and SmolLM2 shapes, bf16, + training
    uv run apps/bench_kernels.py --no-compile       # skip torch.compile (compiling takes a while)
    uv run apps/bench_kernels.py --no-train         # kernels only
    uv run apps/bench_kernels.py --smoke            # tiny shapes: checks the script (on a CPU: in Triton's interpreter)

Per kernel: median time of the forward, and of forward + backward, and the peak memory *added* by forward + backward
(torch.cuda.max_memory_allocated above what was allocated before). Then one full training step (forward, backward,
AdamW) of a ~1B-parameter MinimalLlama (Llama-3.2-1B's shape: 128k vocabulary, tied head) in bf16, plain vs
`minllama.kernels.apply` + `fused_loss`: tokens per second and peak memory.

Without a CUDA GPU it says so and exits with status 0: Triton's CPU interpreter is a correctness tool, ~100x slower
than PyTorch, so timing it would mean nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# name: (dim, hidden_dim, n_heads, n_kv_heads, head_dim, vocab)
SHAPES = {
    "llama3-8b": (4096, 14336, 32, 8, 128, 128256),
    "smollm2-135m": (576, 1536, 9, 3, 64, 49152),
}
SMOKE_SHAPES = {"tiny": (16, 24, 2, 1, 8, 64)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, repeat: int) -> tuple[float, float | None]:
    """(median milliseconds, peak MiB added by one call or None off CUDA) of ``fn()``, after one warm-up call."""
    fn()  # warm-up: compilation, autotuning, allocator
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def kernel_cases(shape, tokens: int, batch: int, device, dtype):
    """For each op: (name, make_inputs, {implementation: function of the inputs returning outputs})."""
    from minllama.core.model import RMSNorm, apply_rope, rope_cache
    from minllama.kernels import decode_attention, fused_linear_cross_entropy, rms_norm, rope_qk, swiglu

    dim, hidden, n_heads, n_kv, head_dim, vocab = shape
    T = tokens // batch

    def leaf(*size, scale=1.0):
        return (torch.randn(*size, device=device, dtype=dtype) * scale).requires_grad_()

    norm = RMSNorm(dim).to(device=device, dtype=dtype)
    rope = rope_cache(1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)), T).to(device)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def eager_rmsnorm(x):
        return norm(x)

    def eager_residual(x, r):
        h = x + r
        return norm(h), h

    def eager_rope(q, k):
        return apply_rope(q, rope), apply_rope(k, rope)

    def eager_swiglu(g, u):
        return F.silu(g) * u

    def eager_ce(h, w):
        return F.cross_entropy(h @ w.T, targets)

    def eager_decode(q, k, v):  # one new token per sequence over a cache of `tokens // batch` slots
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=n_heads != n_kv)

    def cache():
        return torch.randn(batch, n_kv, T, head_dim, device=device, dtype=dtype)

    return [
        ("rmsnorm", lambda: [leaf(tokens, dim)],
         dict(eager=eager_rmsnorm, triton=lambda x: rms_norm(x, norm.weight, norm.eps))),
        ("rmsnorm+residual", lambda: [leaf(tokens, dim), leaf(tokens, dim)],
         dict(eager=eager_residual, triton=lambda x, r: rms_norm(x, norm.weight, norm.eps, residual=r))),
        ("rope q+k", lambda: [leaf(batch, T, n_heads, head_dim), leaf(batch, T, n_kv, head_dim)],
         dict(eager=eager_rope, triton=lambda q, k: rope_qk(q, k, rope))),
        ("swiglu", lambda: [leaf(tokens, hidden), leaf(tokens, hidden)],
         dict(eager=eager_swiglu, triton=swiglu)),
        ("linear+cross-entropy", lambda: [leaf(tokens, dim), leaf(vocab, dim, scale=0.02)],
         dict(eager=eager_ce, triton=lambda h, w: fused_linear_cross_entropy(h, w, targets))),
        ("decode attention", lambda: [torch.randn(batch, n_heads, 1, head_dim, device=device, dtype=dtype), cache(),
                                      cache()],
         dict(eager=eager_decode, triton=decode_attention)),  # inference only: no backward
    ]


def run_kernels(args, device, dtype) -> None:
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    print(f"\nper kernel, {args.tokens} tokens (batch {args.batch}), {str(dtype).removeprefix('torch.')}: "
          "median ms of forward / forward+backward, peak MiB added by forward+backward (by the forward alone for "
          "decode attention, which has no backward)")
    print(f"{'shape':<13} {'op':<21} {'impl':<8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    for shape_name, shape in shapes.items():
        for op, make_inputs, impls in kernel_cases(shape, args.tokens, args.batch, device, dtype):
            if args.compile:
                impls = dict(impls, compiled=torch.compile(impls["eager"]))
            for impl in ("eager", "compiled", "triton"):
                if impl not in impls:
                    continue
                fn, inputs = impls[impl], make_inputs()

                def forward(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        fn(*inputs)

                def forward_backward(fn=fn, inputs=inputs):
                    out = fn(*inputs)
                    out = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
                    for x in inputs:
                        x.grad = None
                try:
                    fwd_ms, fwd_peak = measure(forward, device, args.repeat)
                    if any(x.requires_grad for x in inputs):
                        both_ms, peak = measure(forward_backward, device, args.repeat)
                    else:  # forward only: the peak column is the forward's
                        both_ms, peak = float("nan"), fwd_peak
                except torch.OutOfMemoryError:
                    print(f"{shape_name:<13} {op:<21} {impl:<8} {'out of memory':>31}")
                    continue
                finally:
                    del inputs
                peak_s = f"{peak:>9.0f}" if peak is not None else f"{'-':>9}"
                print(f"{shape_name:<13} {op:<21} {impl:<8} {fwd_ms:>9.3f} {both_ms:>11.3f} {peak_s}", flush=True)


def run_training(args, device, dtype) -> None:
    from minllama.core.config import LlamaConfig
    from minllama.core.model import MinimalLlama
    from minllama.kernels import apply, fused_loss

    name, overrides = ("tiny-gqa", dict(n_layers=1)) if args.smoke else ("llama3.2-1b", dict(max_seq_len=args.seq))
    cfg = LlamaConfig.from_name(name, **overrides)
    seq = min(args.seq, cfg.max_seq_len)
    print(f"\ntraining step of {name} ({'tiny' if args.smoke else '~1B'}), batch {args.batch} x {seq} tokens, "
          f"{str(dtype).removeprefix('torch.')} weights, AdamW")
    print("peak MiB: added by a step above the weights and optimizer state (activations, logits, gradients)")
    print(f"{'model':<22} {'step ms':>9} {'tokens/s':>10} {'peak MiB':>9}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = {}
    for label in ("pytorch", "kernels"):
        torch.manual_seed(0)
        with torch.device(device):
            model = MinimalLlama(cfg)
        model.init_weights()
        model.to(dtype)
        if label == "kernels":
            apply(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step(model=model, opt=opt, label=label):
            if label == "kernels":
                loss = fused_loss(model, inputs, targets)
            else:
                loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        try:
            ms, peak = measure(step, device, args.repeat)
        except torch.OutOfMemoryError:
            print(f"{label:<22} {'out of memory':>30}")
            continue
        finally:
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[label] = (ms, peak)
        peak_s = f"{peak:>9.0f}" if peak is not None else f"{'-':>9}"
        print(f"{label:<22} {ms:>9.1f} {args.batch * seq / ms * 1e3:>10.0f} {peak_s}", flush=True)
    if len(results) == 2 and device.type == "cuda":
        (t0, m0), (t1, m1) = results["pytorch"], results["kernels"]
        print(f"kernels: {t0 / t1:.2f}x the throughput, {100 * (1 - m1 / m0):.0f}% less peak memory")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per kernel call (batch x sequence)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048, help="sequence length of the training step")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training step")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, fp32: checks that the script runs (on the GPU if there is one, else on the "
                        "CPU in Triton's interpreter, TRITON_INTERPRET=1, which it sets itself)")
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.smoke:
        if not interpret and not torch.cuda.is_available():
            # Triton reads TRITON_INTERPRET once, when it is imported: start again with the variable set
            print("no GPU: running the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)", file=sys.stderr,
                  flush=True)
            script_args = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call([sys.executable, os.path.abspath(__file__), *script_args],
                                   env={**os.environ, "TRITON_INTERPRET": "1"})
        args.tokens, args.batch, args.seq, args.repeat, args.compile = 8, 2, 4, 1, False
        device = torch.device("cpu") if interpret else torch.device("cuda")
        dtype = torch.float32
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: the Triton kernels run natively only there (on the CPU they run "
              "in Triton's interpreter, which is for testing, not timing). Nothing measured.")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (a busy machine makes the timings noisy)")
    run_kernels(args, device, dtype)
    if args.train:
        run_training(args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
