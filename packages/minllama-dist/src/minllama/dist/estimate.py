"""Before choosing a layout: what each rank will hold, and what it will send, per training step.

    uv run python -m minllama.dist.estimate --config tinyllama-1.1b --world 8 --batch 8 --seq-len 2048 --budget-gib 80

Everything below is arithmetic on the tensor shapes: no process group, no model is built.

Memory per rank (AdamW, fp32 master weights, P = number of parameters; the tp-split share is P_tp, the rest P_rep):

    parameters   (P_rep + P_tp / tp) / pp / dp_shard  x 4 bytes     FSDP shards what TP left, PP keeps its layers
    gradients    the same                                           (FSDP2 keeps only the reduce-scattered slice)
    AdamW        2 x the same (exp_avg, exp_avg_sq; the step count is a 0-d tensor, counted too)

Activations saved for backward, per block, per token (measured op by op with saved_tensors_hooks, see
``block_activation_elements``; e = bytes of the compute dtype):

    2 RMSNorms      2 x (3 x dim + 1)       input, x * rsqrt, the normalized output, and the rsqrt (one per token)
    attention       3 x n_heads x head_dim  rotated q, SDPA output, wo's input (a copy: transpose + flatten)
                  + 2 x n_kv x head_dim     rotated k, v
                  + n_heads                 SDPA's log-sum-exp
    SwiGLU          4 x hidden_dim          w1 out (silu's input), silu out, w3 out, their product (w2's input)

    per rank: b x T x (that) x e x layers/pp, with b = batch / dp_shard rows and T = seq_len / cp tokens; the
    head adds the final norm (3 x dim + 1), the float32 log-softmax (vocab) and the targets, per token, on the last
    stage. With activation checkpointing a block keeps only its input (dim per token) plus, during its backward, one
    block's worth. Tensor parallel divides the head-, hidden- and vocab-sized terms by tp (and the norms' by tp:
    sequence parallel) but each sub-layer keeps its all-gathered (T, dim) input whole: not measured here yet.

Communication per step, bytes SENT per rank (ring algorithms: a rank sends (n-1)/n of the full tensor):

    FSDP     all-gather  (n-1)/n x (2 x P_blocks + P_root) x e    each block gathered in forward AND in backward
                                                                   (reshard_after_forward); the root once
             reduce-scatter (n-1)/n x P x 4                        the gradients, once, in fp32 (reduce_dtype)
    TP (SP)  4 per block + 2 per head, forward, the same again backward (a gather's backward is a scatter):
             8 x layers + 4 collectives x (t-1)/t x b x T x dim x e
    PP       per micro-batch each boundary sends h (b_m, T, dim) forward and its gradient back:
             2 x b x T x dim x e per rank on an inner boundary (first/last stage: one direction each way)
    CP       ring: each of cp-1 steps sends this rank's k, v block: forward 2 x (cp-1) x b x T x n_kv x head_dim x e,
             backward the same k, v again plus their gradients dk, dv: 4 x (cp-1) x ...
             + the gradients averaged over the cp ranks: all-reduce 2 x (cp-1)/cp x (held params) x 4
    DDP      all-reduce (2 x (n-1)/n x P x 4) (not a layout of the mesh, for comparison)
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch

from minllama.core import LlamaConfig

from .mesh import plan_mesh


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        parts = [f"{d} {getattr(self, d)}" for d in ("pp", "tp", "cp") if getattr(self, d) > 1]
        return " x ".join(parts + [f"FSDP {self.dp_shard}"]) + (" +AC" if self.activation_checkpointing else "")


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank: held (params, grads, optim, activations) and sent per step (comm, by kind)."""

    params: int
    grads: int
    optim: int
    activations: int
    comm: dict

    @property
    def memory(self) -> int:
        return self.params + self.grads + self.optim + self.activations


def block_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(tp-split, replicated) parameter counts of one block: the matrices split over tp, the two norms do not."""
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # wq, wo; wk, wv
    ffn = 3 * d * cfg.hidden_dim  # w1, w2, w3
    return attn + ffn, 2 * d


def root_params(cfg: LlamaConfig) -> tuple[int, int]:
    """(tp-split, replicated) of what is outside the blocks: embedding (+ head unless tied), final norm."""
    emb = cfg.vocab_size * cfg.dim
    return emb * (1 if cfg.tie_embeddings else 2), cfg.dim


def block_activation_elements(cfg: LlamaConfig, tp: int = 1) -> int:
    """Elements saved for backward by one block, per token (the docstring of this module derives each term)."""
    hd = cfg.head_dim
    norms = 2 * (3 * cfg.dim + 1)
    attention = 3 * cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd + cfg.n_heads
    ffn = 4 * cfg.hidden_dim
    return (norms + attention + ffn) // tp if tp > 1 else norms + attention + ffn


def estimate(cfg: LlamaConfig, layout: Layout, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> Estimate:
    """Per-rank bytes for one training step of ``batch`` rows (the global batch) of ``seq_len`` tokens."""
    plan_mesh(layout.pp * layout.dp_shard * layout.cp * layout.tp, tp=layout.tp, pp=layout.pp, cp=layout.cp,
              dp_shard=layout.dp_shard, cfg=cfg, seq_len=seq_len)
    if batch % layout.dp_shard:
        raise ValueError(f"batch {batch} does not split over dp_shard={layout.dp_shard} ranks: use a multiple of it")
    e = torch.empty((), dtype=dtype).element_size()
    pp, n, cp, tp = layout.pp, layout.dp_shard, layout.cp, layout.tp
    layers = cfg.n_layers // pp
    b_split, b_rep = block_params(cfg)
    r_split, r_rep = root_params(cfg)
    per_block = b_split // tp + b_rep
    if pp == 1:
        root, root_tensors = r_split // tp + r_rep, 2 if cfg.tie_embeddings else 3
    else:  # rank 0, the first stage, is what we report: it has the embedding; the last stage has norm + head
        root, root_tensors = cfg.vocab_size * cfg.dim // tp, 1
    held = (layers * per_block + root) // n  # elements of this rank's shards
    params = held * 4
    b, t = batch // n, seq_len // cp
    tokens = b * t
    if layout.activation_checkpointing:
        acts = layers * tokens * cfg.dim * e + tokens * block_activation_elements(cfg, tp) * e
    else:
        acts = layers * tokens * block_activation_elements(cfg, tp) * e
    if pp == 1:  # the head (on the last stage): final norm, float32 log-softmax, int64 targets and tokens
        acts += tokens * (3 * cfg.dim + 1) * e // tp + tokens * cfg.vocab_size * 4 // tp + tokens * 8 * 2
    acts += seq_len * cfg.head_dim * 4  # the RoPE table slice the blocks share
    comm = {}
    if n > 1:
        gathered = (2 * layers * per_block + root) * e
        comm["FSDP all-gather"] = gathered * (n - 1) // n
        comm["FSDP reduce-scatter"] = (layers * per_block + root) * 4 * (n - 1) // n
    if tp > 1:
        comm["TP all-gather + reduce-scatter"] = (8 * layers + 4) * tokens * cfg.dim * e * (tp - 1) // tp
    if pp > 1:
        comm["PP send/recv"] = 2 * tokens * cfg.dim * e  # forward h out, its gradient back in (a boundary stage)
    if cp > 1:
        comm["CP ring k/v"] = 6 * (cp - 1) * b * t * cfg.n_kv_heads * cfg.head_dim * e * layers
        comm["CP gradient all-reduce"] = 2 * (cp - 1) * held * 4 // cp  # the cp ranks saw other tokens
    step_counts = 4 * (9 * layers + root_tensors)  # AdamW's "step": one float32 scalar per parameter tensor
    return Estimate(params=params, grads=params, optim=2 * params + step_counts, activations=acts, comm=comm)


def layouts(world: int, cfg: LlamaConfig, seq_len: int, batch: int) -> list[Layout]:
    """Every (pp, dp_shard, cp, tp) grid of ``world`` ranks this model and batch can be split into, with and without
    activation checkpointing."""
    found = []
    for pp, cp, tp in itertools.product(range(1, world + 1), repeat=3):
        if world % (pp * cp * tp):
            continue
        for ac in (False, True):
            layout = Layout(pp, world // (pp * cp * tp), cp, tp, ac)
            try:
                estimate(cfg, layout, batch, seq_len)
            except ValueError:
                continue
            found.append(layout)
    return found


def table(cfg: LlamaConfig, world: int, batch: int, seq_len: int, budget: float | None = None,
          dtype: torch.dtype = torch.float32) -> str:
    """The layouts that fit ``budget`` bytes per rank (all when None), smallest communication first."""
    rows = []
    for layout in layouts(world, cfg, seq_len, batch):
        est = estimate(cfg, layout, batch, seq_len, dtype)
        if budget is None or est.memory <= budget:
            rows.append((sum(est.comm.values()), layout, est))
    mib = lambda x: f"{x / 2**20:10.1f}"  # noqa: E731
    lines = [f"{'layout':<32}{'params':>10}{'grads':>10}{'AdamW':>10}{'activ.':>10}{'total':>10}{'sent/step':>11}"
             "  (MiB per rank)"]
    for sent, layout, est in sorted(rows, key=lambda r: (r[0], r[2].memory)):
        lines.append(f"{layout.name:<32}{mib(est.params)}{mib(est.grads)}{mib(est.optim)}{mib(est.activations)}"
                     f"{mib(est.memory)}{mib(sent):>11}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tinyllama-1.1b", help="a LlamaConfig preset name")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--budget-gib", type=float, default=None, help="show only layouts that fit this per rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the compute dtype")
    args = p.parse_args(argv)
    cfg = LlamaConfig.from_name(args.config)
    budget = args.budget_gib * 2**30 if args.budget_gib else None
    print(table(cfg, args.world, args.batch, args.seq_len, budget, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
