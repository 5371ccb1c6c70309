"""Peak activation memory per rank of one training step, one process vs context parallel (ring attention).

    uv run apps/bench_cp.py                              # 1k .. 16k tokens, 1 process vs a ring of 2
    uv run apps/bench_cp.py --nproc 4 --seqs 4096 16384  # a ring of 4 (GPUs with NCCL if there are 4, else CPU)

For every sequence length, fresh processes run one forward and backward of a small model on one sequence: first a
single process with core's attention, then ``--nproc`` ranks, each holding 1/N of the sequence (the load-balanced
chunks of minllama.dist.context_parallel). Reported per rank: the peak memory of the step above what was allocated
before it (weights and their gradient buffers), i.e. the activations and the transient buffers of the step (CUDA:
the allocator's peak; CPU: the peak resident set size, with glibc made to return freed memory at once) and the
step time. The activations are what context parallelism divides by N; weights are FSDP's business (bench_dist.py).
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench_dist import set_mmap_threshold  # noqa: E402 (apps/ is on the path when this runs as a script)
from minllama.core import LlamaConfig, MinimalLlama
from minllama.dist import init_distributed, lm_loss
from minllama.dist.context_parallel import apply_context_parallel, context_parallel_loss
from minllama.dist.launch import free_port


def make_model(cfg: LlamaConfig, device: torch.device) -> MinimalLlama:
    torch.manual_seed(0)
    with torch.device(device):
        model = MinimalLlama(cfg)
    model.init_weights()
    for p in model.parameters():  # the gradient buffers exist before the measured step (as from step 2 on)
        p.grad = torch.zeros_like(p)
    return model


def step(model, cp, tokens) -> None:
    loss = lm_loss(model(tokens[:, :-1]), tokens) if cp is None else context_parallel_loss(model, cp, tokens)
    loss.backward()


def used_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(rank: int, world: int, port: int, seq: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = init_distributed()
    if device.type == "cpu":
        set_mmap_threshold(64 * 1024)
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      n_kv_heads=max(1, args.dim // 128), hidden_dim=args.dim * 3, max_seq_len=max(args.seqs))
    tiny = make_model(LlamaConfig.from_name("tiny-gqa"), device)  # load kernels and allocator pools first
    step(tiny, apply_context_parallel(tiny) if world > 1 else None, torch.randint(0, 256, (1, 65), device=device))
    model = make_model(cfg, device)
    cp = apply_context_parallel(model) if world > 1 else None
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else used_memory(device)
    dist.barrier()
    t0 = time.perf_counter()
    step(model, cp, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = used_memory(device) - before
    torch.save({"peak": peak, "seconds": seconds, "device": device.type, "n_params": model.num_params()},
               Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run(world: int, seq: int, args, use_cuda: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(world, free_port(), seq, args, out), nprocs=world,
                           start_method="spawn" if use_cuda else "fork")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks in the ring (default 2)")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    args = p.parse_args()
    if args.dim % 128 or args.nproc < 2 or min(args.seqs) < 1:
        p.error("--dim must be a multiple of 128, --nproc at least 2, every --seqs length at least 1")
    use_cuda = torch.cuda.device_count() >= args.nproc and os.environ.get("MINLLAMA_DEVICE") != "cpu"
    if not use_cuda:
        os.environ["MINLLAMA_DEVICE"] = "cpu"
    mib = 2.0**20
    header = f"{'tokens':>8}{'1 process MiB':>15}{f'CP {args.nproc} ranks MiB (max rank)':>32}{'ratio':>8}" \
             f"{'step s: 1 process':>20}{f'{args.nproc} ranks':>10}"
    rows = []
    for seq in args.seqs:
        single, ring = run(1, seq, args, use_cuda)[0], run(args.nproc, seq, args, use_cuda)
        peak = max(r["peak"] for r in ring)
        rows.append(f"{seq:>8}{single['peak'] / mib:>15.1f}{peak / mib:>32.1f}{single['peak'] / max(peak, 1):>8.2f}"
                    f"{single['seconds']:>20.3f}{max(r['seconds'] for r in ring):>10.3f}")
    print(f"model: {single['n_params'] / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab "
          f"{args.vocab}), one sequence per step, fp32, on {single['device']}; peak memory of one forward+backward "
          f"above the weights and gradient buffers")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
