"""Per-rank memory and step time of data-parallel training: unsharded (DDP) vs FSDP2, with and without prefetch.

    uv run apps/bench_dist.py                 # 2 ranks on this machine: GPUs (NCCL) if there are 2, else CPU (gloo)
    uv run apps/bench_dist.py --dim 1024 --layers 12 --nproc 4
    uv run apps/bench_dist.py --layouts          # 4 CPU ranks: FSDP 4, TP 2 x FSDP 2, PP 2 x FSDP 2, CP 2 x FSDP 2,
                                                 # TP 4, each measured next to minllama.dist.estimate's prediction
    uv run apps/bench_dist.py --layouts --quick  # the same on a tiny model (seconds: the smoke test)

Each configuration runs in fresh processes (so the peak memory of one cannot hide in another's) and reports, per
rank: bytes of parameters, gradients and optimizer state actually held, the peak memory over the warm-up steps
(CUDA: the allocator's peak; CPU: the peak resident set size above the size before the model was built, freed
memory returned to the OS at once) and the median step time. A shared machine makes the times noisy: the load
average is printed before and after.

``--layouts`` compares the layouts of the (pp, dp_shard, cp, tp) mesh instead, on 4 gloo ranks, each in fresh
processes: per rank 0 (the first pipeline stage) the bytes of parameters + gradients + AdamW state held, the
activations saved for backward (unique storages, ``saved_tensors_hooks``), the bytes sent in one step (every
c10d and DTensor collective counted, ``minllama.dist.traffic``), the peak resident memory above the baseline and
the time of the measured forward + backward (counting hooks included), each next to the estimator's prediction.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minllama.core import LlamaConfig, MinimalLlama
from minllama.dist import apply_fsdp, data_parallel_mesh, init_distributed, lm_loss, materialize, meta_model
from minllama.dist.estimate import Layout, estimate
from minllama.dist.launch import free_port
from minllama.dist.measure import local_bytes, measure_step

MODES = {
    "unsharded (DDP)": None,
    "FSDP2, no prefetch": {"prefetch": 0},
    "FSDP2, prefetch 1": {"prefetch": 1},
}


def peak_memory(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # Linux: ru_maxrss in KiB


def set_mmap_threshold(nbytes: int) -> None:
    """glibc keeps freed blocks for reuse, so the resident size would count FSDP's transient all-gather buffers
    forever. With a low mmap threshold every tensor above it is its own mapping, unmapped when freed: the peak
    resident size then measures memory actually in use at once (but each allocation is a system call: slow, so
    the timed steps run with a high threshold again)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: the CPU peak is then an upper bound


def warm_up_libraries(device: torch.device) -> None:
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa")).to(device)
    opt = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 256, (1, 9), device=device)
    lm_loss(model(tokens[:, :-1]), tokens).backward()
    opt.step()


def worker(rank: int, world: int, port: int, mode: str, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed()
    if device.type == "cpu":
        set_mmap_threshold(64 * 1024)
    warm_up_libraries(device)  # load kernels and allocator pools first, so that the baseline excludes them
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                      n_kv_heads=max(1, args.dim // 128), hidden_dim=int(args.dim * 8 / 3) // 64 * 64, max_seq_len=args.seq)
    torch.manual_seed(0)
    if MODES[mode] is None:  # every rank builds and keeps the whole model
        with torch.device(device):
            model = MinimalLlama(cfg)
        model.init_weights()
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:  # shapes on the meta device, shard, then allocate only this rank's shards
        model = apply_fsdp(meta_model(cfg), data_parallel_mesh(device), **MODES[mode])
        materialize(model, device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    times, grad_bytes = [], 0
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        loss = lm_loss(model(tokens[:, :-1]), tokens)
        loss.backward()
        grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if step == args.warmup - 1:  # the warm-up steps (optimizer state created) measure the memory
            peak = peak_memory(device, baseline)
            if device.type == "cpu":
                set_mmap_threshold(32 * 2**20)
    optim_bytes = local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    result = {"params": local_bytes(params), "grads": grad_bytes, "optim": optim_bytes,
              "peak": peak, "step": statistics.median(times), "device": str(device),
              "n_params": meta_model(cfg).num_params()}
    torch.save(result, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


LAYOUTS = [Layout(dp_shard=4), Layout(tp=2, dp_shard=2), Layout(pp=2, dp_shard=2), Layout(cp=2, dp_shard=2),
           Layout(tp=4)]


def layout_config(args) -> LlamaConfig:
    """The model of the layout table: 4 kv heads (so that TP 4 splits them) and the most query heads of at least
    64 channels (quick: 16) that are a multiple of 4 and divide --dim (at least 4)."""
    hd = 16 if args.quick else 64
    heads = max(4, args.dim // hd // 4 * 4)
    while heads > 4 and args.dim % heads:
        heads -= 4
    if args.dim % heads:
        raise SystemExit(f"error: --dim {args.dim} does not split into 4 heads: use a multiple of 4")
    return LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=heads,
                       n_kv_heads=4, hidden_dim=int(args.dim * 8 / 3) // 64 * 64, max_seq_len=args.seq)


def layout_worker(rank: int, world: int, port: int, layout: Layout, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MINLLAMA_DEVICE="cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    set_mmap_threshold(64 * 1024)
    warm_up_libraries(torch.device("cpu"))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = measure_step(layout_config(args), layout, args.batch * layout.dp_shard, args.seq)
    result["peak"] = peak_memory(torch.device("cpu"), baseline)
    torch.save(result, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def compare_layouts(args) -> None:
    """One table: every layout of LAYOUTS on 4 fresh ranks, measured | estimated | ratio."""
    cfg = layout_config(args)
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    print(f"model: {meta_model(cfg).num_params() / 1e6:.2f}M parameters (dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv, vocab {cfg.vocab_size}), 4 CPU ranks (gloo), "
          f"{args.batch}x{args.seq} tokens per data-parallel rank, fp32, AdamW; rank 0; MiB measured / estimated "
          f"(ratio)")
    print(f"{'layout':<18}{'params+grads+AdamW':>26}{'activations':>26}{'sent per step':>26}{'peak MiB':>10}"
          f"{'step s':>8}")
    cell = lambda got, est: f"{mib(got)} / {mib(est)} ({got / est:.2f})"  # noqa: E731
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(layout_worker, args=(4, free_port(), layout, args, out), nprocs=4,
                               start_method="fork")
            results = [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(4)]
        got, est = results[0], estimate(cfg, layout, args.batch * layout.dp_shard, args.seq)
        held = got["params"] + got["grads"] + got["optim"]
        print(f"{layout.name:<18}{cell(held, est.params + est.grads + est.optim):>26}"
              f"{cell(got['activations'], est.activations):>26}"
              f"{cell(sum(got['sent'].values()), sum(est.comm.values())):>26}{mib(got['peak']):>10}"
              f"{max(r['step_s'] for r in results):>8.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="rows per rank")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (0: PyTorch's default)")
    p.add_argument("--layouts", action="store_true", help="compare the mesh layouts on 4 CPU ranks (see above)")
    p.add_argument("--quick", action="store_true", help="with --layouts: a tiny model (dim 64, 2 layers)")
    args = p.parse_args()
    if args.layouts:
        if args.quick:
            args.dim, args.layers, args.vocab, args.seq = 64, 2, 256, 32
        if args.layers % 2:
            p.error("--layers must be even with --layouts (PP 2 splits them into two stages)")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        compare_layouts(args)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    if args.dim % 128:
        p.error("--dim must be a multiple of 128 (heads of 64 channels, 2 query heads per kv head)")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the warm-up steps measure the peak memory)")
    use_cuda = torch.cuda.device_count() >= args.nproc and os.environ.get("MINLLAMA_DEVICE") != "cpu"
    if not use_cuda:
        os.environ["MINLLAMA_DEVICE"] = "cpu"
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    rows = []
    for mode in MODES:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(worker, args=(args.nproc, free_port(), mode, args, out), nprocs=args.nproc,
                               start_method="spawn" if use_cuda else "fork")
            results = [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(args.nproc)]
        rows.append((mode, results))
    r0 = rows[0][1][0]
    mib = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
    print(f"model: {r0['n_params'] / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {args.vocab}),"
          f" {args.nproc} ranks on {r0['device'].split(':')[0]}, {args.batch}x{args.seq} tokens per rank, fp32, AdamW")
    print(f"{'per rank (rank 0)':<22}{'params MiB':>11}{'grads MiB':>11}{'optim MiB':>11}{'sum MiB':>10}"
          f"{'peak MiB':>10}{'step s (max rank)':>19}")
    for mode, results in rows:
        r = results[0]
        step = max(x["step"] for x in results)
        print(f"{mode:<22}{mib(r['params']):>11}{mib(r['grads']):>11}{mib(r['optim']):>11}"
              f"{mib(r['params'] + r['grads'] + r['optim']):>10}{mib(r['peak']):>10}{step:>19.3f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
