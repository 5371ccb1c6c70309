"""Benchmark: LoRA training step of minllama.peft vs full finetuning, and vs HF peft + transformers.

Same model (SmolLM2-135M-Instruct, fp32), same batch, same LoRA (rank, alpha, targets), same optimizer (AdamW).
Each variant runs in its own forked process, so that its peak memory is its own: on the CPU we reset the process's
peak resident set size (/proc/self/clear_refs) and report how far it rose above the loaded model during the steps;
on CUDA, torch.cuda.max_memory_allocated above the model.

    uv run apps/bench_peft.py                       # B=4, T=128
    uv run apps/bench_peft.py --batch 2 --seq-len 32 --steps 2
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from minllama.core import load_pretrained, save_hf
from minllama.peft import LoraConfig, adapter_parameters, apply_lora, trainable_parameter_count

# peft calls transformers' deprecated `is_gradient_checkpointing` ("... will be removed in v6"): a warning for the
# two libraries' authors, not for a reader of this benchmark (which never touches it)
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")

HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
            "w3": "up_proj"}


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: str) -> float:
    """Reset the peak-memory counter; return the memory in use now (MiB)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
    except OSError:
        pass
    return rss_mib("VmRSS")


def peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM")


def run_variant(kind: str, models: dict, args, queue) -> None:
    """One variant in a forked child: set up, warm up, time ``args.steps`` steps, report."""
    try:
        torch.set_num_threads(args.threads)  # a forked child must (re)size its own pool: a parent's OpenMP pool
        torch.manual_seed(0)                 # does not survive fork, and using it there can hang
        cfg = LoraConfig(r=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(",")))
        if kind.startswith("minllama"):
            model = models["ours"]
            if kind.endswith("LoRA"):
                apply_lora(model, cfg)
                params = adapter_parameters(model)
            else:
                params = [p for p in model.parameters()]
            trainable = trainable_parameter_count(model)[0]
            forward = model
        else:
            import peft

            model = models["hf"]
            if kind.endswith("LoRA"):
                model = peft.get_peft_model(model, peft.LoraConfig(
                    r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=[HF_NAMES[t] for t in cfg.targets]))
            params = [p for p in model.parameters() if p.requires_grad]
            trainable = sum(p.numel() for p in {id(p): p for p in params}.values())

            def forward(ids):
                return model(input_ids=ids).logits
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, models["vocab"], (args.batch, args.seq_len), device=args.device,
                            generator=torch.Generator().manual_seed(1)) if args.device == "cpu" else \
            torch.randint(0, models["vocab"], (args.batch, args.seq_len), device=args.device)

        def step():
            logits = forward(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        base = reset_peak(args.device)
        step()  # warm-up: allocates the optimizer state and the gradients, as every later step needs them
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        queue.put((kind, statistics.median(times), trainable, peak(args.device) - base, None))
    except Exception as e:  # report and go on with the other variants
        queue.put((kind, None, None, None, f"{type(e).__name__}: {e}"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--targets", default="wq,wk,wv,wo,w1,w2,w3", help="adapted layers (our names)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per variant (the same for all)")
    p.add_argument("--only", nargs="*", help="run only these variants (names as printed)")
    args = p.parse_args(argv)

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs "
          f"(a loaded machine makes every time slower and noisier)")
    from transformers import LlamaForCausalLM

    ours, _ = load_pretrained("smollm2-135m-instruct", device=args.device, with_tokenizer=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(args.device)
    models = {"ours": ours, "hf": hf, "vocab": ours.config.vocab_size}
    variants = ["minllama LoRA", "HF peft LoRA", "minllama full", "HF full"]
    variants = [v for v in variants if not args.only or v in args.only]
    print(f"SmolLM2-135M fp32 on {args.device} ({args.threads} CPU thread(s)), batch {args.batch} x {args.seq_len} "
          f"tokens, LoRA r={args.rank} on "
          f"{args.targets}, AdamW, median of {args.steps} steps\n")
    ctx = mp.get_context("fork")  # the children share the loaded models; each one's changes stay its own
    rows = {}
    for kind in variants:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(kind, models, args, queue))
        proc.start()
        rows[kind] = queue.get()
        proc.join()
    header = f"{'variant':<16}{'step (ms)':>12}{'trainable params':>18}{'peak memory above model (MiB)':>32}"
    print(header)
    print("-" * len(header))
    for kind, t, n, mem, err in rows.values():
        if err:
            print(f"{kind:<16} failed: {err}")
        else:
            print(f"{kind:<16}{1000 * t:>12.0f}{n:>18,}{mem:>32.0f}")
    ok = {k: r for k, r in rows.items() if r[4] is None}
    if "minllama LoRA" in ok and "HF peft LoRA" in ok:
        a, b = ok["minllama LoRA"], ok["HF peft LoRA"]
        print(f"\nminllama LoRA vs HF peft LoRA: {b[1] / a[1]:.2f}x the speed, {a[3] / max(b[3], 1e-9):.2f}x the "
              f"peak memory")
    if "minllama LoRA" in ok and "minllama full" in ok:
        a, b = ok["minllama LoRA"], ok["minllama full"]
        print(f"minllama LoRA vs full finetuning: {b[1] / a[1]:.2f}x the speed, {b[2] / a[2]:.0f}x fewer trainable "
              f"parameters, {a[3] / max(b[3], 1e-9):.2f}x the peak memory")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
