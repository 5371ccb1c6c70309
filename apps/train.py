"""Pretrain a tiny MinimalLlama from scratch on a small text, on one process or many (FSDP2), with checkpoints.

    uv run apps/train.py --steps 300                                           # one process (GPU if there is one)
    uv run torchrun --standalone --nproc-per-node 2 apps/train.py --steps 300  # 2 processes, sharded (FSDP2)
    MINLLAMA_DEVICE=cpu uv run torchrun --standalone --nproc-per-node 2 apps/train.py   # 2 CPU processes (gloo)
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --tp 2       # FSDP over 2 x tensor parallel 2
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --pp 2       # pipeline: 2 stages x FSDP over 2
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --cp 2       # rings of 2 ranks split each window
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --pp 2 --tp 2    # 2 stages, each tensor parallel
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --cp 2 --tp 2    # rings of 2 x tensor parallel 2
    uv run torchrun --standalone --nproc-per-node 4 apps/train.py --pp 2 --cp 2    # 2 stages, each a ring of 2
    uv run torchrun --standalone --nproc-per-node 8 apps/train.py --pp 2 --tp 2    # 3-D: 2 stages x FSDP 2 x tp 2

The ranks form a (pp, dp_shard, cp, tp) mesh: --tp splits every weight matrix (and the sequence between blocks)
over that many neighbouring ranks; FSDP shards over the rest (--dp-shard, derived: world / (pp * cp * tp)).
Every combination of --pp, --cp and --tp composes (with FSDP on what is left); --bf16 computes in bf16 with fp32
master weights and gradient sums in every layout, pipelines included.

Tokens are bytes (vocab 256, the size of the tiny presets), so no tokenizer is needed. The default corpus,
apps/data/fables.txt, is original text dedicated to the public domain (CC0). Every --ckpt-every steps a DCP
checkpoint is written to OUT/checkpoints/ (atomically; the newest --keep are kept). Running the same command again
resumes from the latest checkpoint: same data order, same RNG, so the loss curve continues as if the run had never
stopped (to 1e-6 on the same mesh; on another number of ranks or another --tp, which is allowed, float rounding
makes it drift: minllama-dist's README gives the measured drift); a checkpoint made with other settings (model,
corpus, seed, batch, window, learning rate) is refused, so two runs cannot share an --out by accident. OUT/loss.csv
holds the loss of every step; samples of generated text are printed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minllama.core import CheckpointError, LlamaConfig
from minllama.core.config import PRESETS
from minllama.dist import (MESH_DIMS, CheckpointManager, TokenBatches, build_mesh, check_checkpoint, dcp_to_hf,
                           init_distributed, init_from_rank0, materialize, meta_model, parallelize_llama,
                           pipeline_for_training, pipeline_train_step, plan_mesh, shutdown, train_step)
from minllama.dist.context_parallel import cp_train_step
from minllama.dist.parallelize import full_logits, pad_to_multiple

DEFAULT_CORPUS = Path(__file__).parent / "data" / "fables.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-gqa", help="model preset with vocab_size 256 (default tiny-gqa)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a UTF-8 text file (default: the fables)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="checkpoints, loss.csv (default runs/train)")
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch, split across the ranks (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per training window (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="weights and data order (default 0)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint period in steps (default 50)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    p.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    p.add_argument("--sample-every", type=int, default=100, help="print a generated sample every N steps")
    p.add_argument("--prompt", default="The fox", help="the start of the printed samples")
    p.add_argument("--bf16", action="store_true", help="compute in bf16 (fp32 master weights and reductions)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in OUT (start over)")
    p.add_argument("--export-hf", type=Path, help="at the end, also write the model as an HF directory here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1: measured on 2 shared cores, the tiny default model "
                        "trains no faster with 2, and 2 ranks x 2 threads oversubscribe them)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: ranks that split each weight matrix "
                   "and, between blocks, the sequence (default 1)")
    p.add_argument("--dp-shard", type=int, help="FSDP degree (default: world / (pp * cp * tp))")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel stages: each rank holds 1/pp of the layers; the world size must be a "
                        "multiple (the other factor shards each stage with FSDP) (default 1: no pipeline)")
    p.add_argument("--pp-schedule", choices=["gpipe", "1f1b", "interleaved"], default="1f1b",
                   help="the pipeline schedule; interleaved: 2 stages per rank (default 1f1b)")
    p.add_argument("--layers", type=int,
                   help="override the preset's number of layers (the tiny ones have 2; e.g. 4 for --pp 2 --pp-schedule "
                        "interleaved, which needs 2 stages per rank)")
    p.add_argument("--microbatches", type=int, default=4,
                   help="micro-batches per step under --pp (the per-replica batch must divide) (default 4)")
    p.add_argument("--cp", type=int, default=1,
                   help="context parallel: split each window over N ranks with ring attention; N consecutive ranks "
                        "read the same rows, and the world must be a multiple of N (default 1)")
    p.add_argument("--crash-at-step", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL self after that step
    return p.parse_args(argv)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@torch.no_grad()
def sample(model, prompt: str, new_tokens: int, device, tp: int = 1) -> str:
    """Greedy continuation without a KV cache: every rank runs it (the sharded forward is collective). Under
    tensor parallel the window is right-padded to a multiple of tp (sequence parallel splits it; causal attention
    keeps the padding out of the last real position) and the vocabulary-sharded logits are gathered."""
    model.eval()
    tokens = encode(prompt)[None].to(device)  # (1, T)
    for _ in range(new_tokens):
        window = tokens[:, -(model.config.max_seq_len // tp * tp):]
        logits = full_logits(model(pad_to_multiple(window, tp)))  # (1, T', vocab)
        nxt = logits[:, window.shape[1] - 1].argmax(-1, keepdim=True)  # (1, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
    model.train()
    return decode(tokens[0].tolist())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config.lower() not in PRESETS:
        sys.exit(f"error: unknown --config {args.config!r}")
    if args.layers is not None and args.layers < 1:
        sys.exit(f"error: --layers {args.layers}: a model needs at least 1 layer")
    cfg = LlamaConfig.from_name(args.config, **({"n_layers": args.layers} if args.layers else {}))
    if cfg.vocab_size < 256:
        sys.exit(f"error: --config {args.config} has vocab_size {cfg.vocab_size}; byte tokens need 256")
    if args.seq_len > cfg.max_seq_len:
        sys.exit(f"error: --seq-len {args.seq_len} exceeds the context of {args.config} ({cfg.max_seq_len})")
    if not args.corpus.is_file():
        sys.exit(f"error: --corpus {args.corpus}: no such file")
    try:  # checked before joining the group: torchrun's WORLD_SIZE is the number of ranks
        shape = plan_mesh(int(os.environ.get("WORLD_SIZE", "1")), tp=args.tp, pp=args.pp, cp=args.cp,
                          dp_shard=args.dp_shard, cfg=cfg, seq_len=args.seq_len)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cfg.max_seq_len % shape.tp:
        sys.exit(f"error: --config {args.config} has a context of {cfg.max_seq_len}, not a multiple of --tp "
                 f"{shape.tp} (sampling pads the window to one)")
    if args.batch_size % shape.dp_shard:
        sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of the {shape.dp_shard} data-parallel "
                 f"groups (dp_shard; the tp ranks of a group share its rows)")
    torch.set_num_threads(max(args.threads, 1))
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    main_rank = rank == 0
    # The model: built on the meta device, sharded (tensor parallel over "tp", then FSDP over "dp_shard"), and only
    # then allocated (each rank: its shards only). Rank 0 draws the initial weights and broadcasts them, so that
    # every mesh starts from the same numbers. With --pp, each rank keeps only its stages' layers
    # (minllama.dist.pipeline; each stage tensor parallel over "tp" with --tp, a ring over "cp" with --cp),
    # starting from the same numbers. With --cp, the ranks of a ring (the "cp" dimension) read the same rows, each
    # its part of every window (ring attention, on the local heads under --tp), and FSDP shards over dp_shard x cp.
    pipe, step_fn = None, train_step
    param_dtype = torch.bfloat16 if args.bf16 else None
    if shape.pp > 1:
        try:
            pipe = pipeline_for_training(cfg, args.seed, device, args.pp, args.pp_schedule, args.microbatches,
                                         args.batch_size, activation_checkpointing=args.activation_checkpointing,
                                         tp=shape.tp, cp=shape.cp, param_dtype=param_dtype)
        except ValueError as e:
            sys.exit(f"error: {e}")
        model, dp_rank = pipe.model, pipe.dp_rank
    else:
        mesh = build_mesh(shape, device.type)
        dp_rank = mesh["dp_shard"].get_local_rank()  # which rows of each global batch are ours
        model = meta_model(cfg)
        parallelize_llama(model, mesh, param_dtype=param_dtype, activation_checkpointing=args.activation_checkpointing)
        materialize(model, device, init=False)
        init_from_rank0(model, args.seed)
        if shape.cp > 1:
            def step_fn(m, opt, tokens):
                return cp_train_step(m, opt, tokens, m.context_parallel)
    torch.manual_seed(args.seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    data = TokenBatches(encode(args.corpus.read_text("utf-8")), args.seq_len, args.batch_size, seed=args.seed)

    manager = CheckpointManager(args.out / "checkpoints", keep=args.keep, async_save=args.async_save)
    loss_log = args.out / "loss.csv"
    start = 0
    # what a resumed run must share with the checkpoint: the data position counts batches of one corpus, shape and
    # order, and the optimizer state brings its learning rate back (a new --lr would be silently ignored)
    run_shape = {"seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                 "corpus": f"{args.corpus.name}, {data.tokens.numel()} bytes"}
    try:  # every rank reaches the same verdict (the checks read only the shared filesystem)
        if not args.fresh and manager.latest() is not None:
            saved = check_checkpoint(manager.latest())
            changed = {k: (saved[k], v) for k, v in run_shape.items() if k in saved and saved[k] != v}
            if changed:  # (another --config: load_latest refuses it below, "holds another model")
                sys.exit(f"error: {args.out} holds a run with other settings, {changed} (checkpoint, now): "
                         f"resume it with the same options, give this run its own --out, or start over with --fresh")
        state = None if args.fresh else manager.load_latest(model, optimizer)
    except CheckpointError as e:
        sys.exit(f"error: {e} (give this run its own --out, or start over with --fresh)")
    if state is not None:
        start, data.position = state["step"], state["data_position"]
        if main_rank and start >= args.steps:
            print(f"{manager.latest()} is already at step {start} (--steps {args.steps}): nothing to train; pass "
                  f"more --steps to go on, or --fresh to start over", file=sys.stderr)
        if main_rank:
            print(f"resumed from {manager.latest()} (step {start})", file=sys.stderr)
    if main_rank and pipe and args.sample_every:
        print("no samples under --pp: each rank holds only some of the layers", file=sys.stderr)
    if main_rank:  # the loss log continues from the checkpoint: drop the rows of steps that are being redone
        args.out.mkdir(parents=True, exist_ok=True)
        rows = loss_log.read_text().splitlines()[1:] if loss_log.is_file() and start else []
        kept = [r for r in rows if int(r.split(",")[0]) <= start]
        loss_log.write_text("".join(line + "\n" for line in ["step,loss", *kept]))

    from tqdm import tqdm  # only the main rank draws a progress bar

    bar = tqdm(total=args.steps, initial=start, disable=not main_rank, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        tokens = data.next_for_rank(dp_rank, shape.dp_shard).to(device)
        loss = pipeline_train_step(pipe, optimizer, tokens) if pipe else step_fn(model, optimizer, tokens)
        if main_rank:
            with open(loss_log, "a") as f:
                f.write(f"{step},{loss:.7f}\n")
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update()
        if step % args.ckpt_every == 0 or step == args.steps:
            manager.save(step, model, optimizer, {"data_position": data.position, **run_shape})
        if args.sample_every and not pipe and (step % args.sample_every == 0 or step == args.steps):
            text = sample(model, args.prompt, 48, device, shape.tp)
            if main_rank:
                bar.write(f"[step {step}] {text!r}")
        if step == args.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut: no cleanup, no final save
    manager.wait()
    bar.close()
    if main_rank:
        done = args.steps - start
        layout = " x ".join(f"{d}={n}" for d, n in zip(MESH_DIMS, shape.sizes))
        print(f"done: {done} steps in {time.perf_counter() - t0:.1f}s on {world} rank(s) ({device.type}, "
              f"{layout}); checkpoint {manager.latest()}; losses in {loss_log}", file=sys.stderr)
        if args.export_hf:
            dcp_to_hf(manager.latest(), args.export_hf)
            print(f"exported {args.export_hf} (load it with minllama.core.load_pretrained)", file=sys.stderr)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
