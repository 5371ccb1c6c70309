"""Before choosing a layout: what each rank will hold, and what it will send, per training step.

    uv run python -m minllama.dist.estimate --config tinyllama-1.1b --world 8 --batch 8 --seq-len 2048 --budget-gib 80

Everything below is arithmetic on the tensor shapes: no process group, no model is built.

Memory per rank (AdamW, fp32 master weights, P = number of parameters; the tp-split share is P_tp, the rest P_rep):

    parameters   (P_rep + P_tp / tp) / pp / (dp_shard x cp)  x 4 bytes  FSDP shards what TP left (over the cp
    gradients    the same                                   ranks too), PP keeps its layers; FSDP2 keeps only
    AdamW        2 x the same + 4 bytes per tensor          the reduce-scattered slice of each gradient; AdamW's
                                                            exp_avg, exp_avg_sq and a float32 step count

Activations saved for backward, per block, per token (found op by op with saved_tensors_hooks, see
``block_activation_elements``; e = bytes of the compute dtype):

    2 RMSNorms      2 x (3 x dim + 1)       input (the residual stream), x * rsqrt, the normalized output (what
                                            the projections read), and the rsqrt (one number per token)
    attention       2 x n_heads x head_dim  rotated q, SDPA output (wo reads the same storage)
                  + 2 x n_kv x head_dim     rotated k, v
                  + n_heads                 SDPA's log-sum-exp
    SwiGLU          4 x hidden_dim          w1 out (silu's input), silu out, w3 out, their product (w2's input)

    per rank: (that) x b x T x e x layers/pp, b = batch / dp_shard rows, T = seq_len / cp tokens (padded to 2 x cp
    ring chunks). The last stage adds the final norm, the float32 log-softmax (vocab) and the int64 targets.
    Tensor parallel (with sequence parallel): the attention and SwiGLU terms / tp (this rank's heads and columns),
    each norm's (2 x dim + 1) / tp (its slice of the sequence), but its normalized output dim stays whole: the
    projections keep the all-gathered (T, dim) input. Activation checkpointing: a block keeps only its input
    (dim per token, / tp); while its backward runs one block's worth is recomputed and dropped (transient: not in
    the estimate).

Communication per step, bytes SENT per rank (ring algorithms: a rank sends (n-1)/n of the full tensor, twice that
for an all-reduce):

    FSDP     all-gather  (n-1)/n x (2 x P_blocks + P_root) x e  each block gathered in forward AND backward
                                                                (reshard_after_forward); the root once; a
                                                                pipeline stage: everything once
             reduce-scatter (n-1)/n x P x 4                     the gradients, once, in fp32 (reduce_dtype)
             (n = dp_shard x cp; P the parameters this tp rank / pp stage holds)
    TP (SP)  forward: 2 all-gathers + 2 reduce-scatters per block, 1 + 1 for the embedding and the head;
             backward: 2 all-gathers + 5 all-reduces per block, 1 + 1 (see ``estimate``); with activation
             checkpointing the forward's 4 again: (16 [+4] x layers + 4) x (t-1)/t x b x T x dim x e
    PP       each boundary sends h (b, T, dim) forward and its gradient back: b x T x dim x e per step from
             the first stage (and the gradient from the last), twice that from an inner stage
    CP       ring, per layer: k, v to the next rank at cp-1 steps forward and again backward, their gradients
             dk, dv (fp32) at cp steps: (2 x (cp-1) x e + cp x 4) x 2 x b x T x n_kv x head_dim
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch

from minllama.core import LlamaConfig

from .mesh import MeshShape, plan_mesh


@dataclass(frozen=True)
class Layout(MeshShape):
    """A mesh shape, and whether each block's activations are recomputed in backward."""

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


def norm_activation_elements(cfg: LlamaConfig, tp: int = 1) -> float:
    """One RMSNorm, per token: its input, x * rsqrt and the rsqrt on this rank's slice of the sequence (all of it
    without tp), and the normalized output the next projection reads: all-gathered, whole, under sequence
    parallel."""
    return (2 * cfg.dim + 1) / tp + cfg.dim


def block_activation_elements(cfg: LlamaConfig, tp: int = 1) -> float:
    """Elements saved for backward by one block, per token (the docstring of this module derives each term)."""
    hd = cfg.head_dim
    attention = 2 * cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd + cfg.n_heads  # this rank's heads: / tp
    ffn = 4 * cfg.hidden_dim  # this rank's columns: / tp
    return 2 * norm_activation_elements(cfg, tp) + (attention + ffn) / tp


def estimate(cfg: LlamaConfig, layout: Layout, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> Estimate:
    """Per-rank bytes for one training step of ``batch`` rows (the global batch) of ``seq_len`` tokens."""
    plan_mesh(layout.pp * layout.dp_shard * layout.cp * layout.tp, tp=layout.tp, pp=layout.pp, cp=layout.cp,
              dp_shard=layout.dp_shard, cfg=cfg, seq_len=seq_len)
    if batch % layout.dp_shard:
        raise ValueError(f"batch {batch} does not split over dp_shard={layout.dp_shard} ranks: use a multiple of it")
    e = torch.empty((), dtype=dtype).element_size()
    pp, n, cp, tp = layout.pp, layout.dp_shard, layout.cp, layout.tp
    fsdp = n * cp  # FSDP shards over the cp ranks too: a ring's ranks hold the same weights
    layers = cfg.n_layers // pp
    b_split, b_rep = block_params(cfg)
    r_split, r_rep = root_params(cfg)
    per_block = b_split // tp + b_rep
    if pp == 1:
        root, root_tensors = r_split // tp + r_rep, 2 if cfg.tie_embeddings else 3
    else:  # rank 0, the first stage, is what we report: it has the embedding; the last stage has norm + head
        root, root_tensors = cfg.vocab_size * cfg.dim // tp, 1
    held = (layers * per_block + root) // fsdp  # elements of this rank's shards
    params = held * 4
    b = batch // n
    t = seq_len if cp == 1 else -(-seq_len // (2 * cp)) * 2  # ring chunks: padded to 2 x cp equal chunks
    tokens = b * t
    if layout.activation_checkpointing:
        acts = layers * tokens * cfg.dim * e // tp  # (+ one block's worth, transient, while it is recomputed)
    else:
        acts = int(layers * tokens * block_activation_elements(cfg, tp) * e)
    if pp == 1:  # the head (on the last stage): final norm, float32 log-softmax, int64 targets and tokens
        acts += int(tokens * norm_activation_elements(cfg, tp) * e) + tokens * cfg.vocab_size * 4 // tp + tokens * 16
    acts += seq_len * cfg.head_dim * 4  # the RoPE table slice the blocks share
    comm = {}
    if fsdp > 1:
        # blocks: gathered for forward, freed, gathered again for backward; the root stays gathered in between.
        # A pipeline stage keeps its weights gathered from forward to backward (reshard_after_forward=False: a
        # block runs once per micro-batch): one all-gather per step.
        gathered = (2 * layers * per_block + root) * e if pp == 1 else (layers * per_block + root) * e
        comm["FSDP all-gather"] = gathered * (fsdp - 1) // fsdp
        comm["FSDP reduce-scatter"] = (layers * per_block + root) * 4 * (fsdp - 1) // fsdp
    if tp > 1:
        # in units of one (b, T, dim) activation S, a ring collective sending (tp-1)/tp x S (an all-reduce twice):
        # per block 2 all-gathers + 2 reduce-scatters forward; backward 2 all-gathers (of the reduce-scatters) and
        # 5 all-reduces: wq, wk, wv, w1, w3 each sum their input's gradient (their shared input is a plain tensor
        # after PrepareModuleInput(use_local_output=True), so the partial sums are not combined first)
        # = 16 per block; the embedding and the head 4; the norms' weight gradients and loss_parallel's
        # per-token statistics (max, sum, target logit, ...: 4 all-reduces of (b, T) floats) are small.
        units = (16 + (4 if layout.activation_checkpointing else 0)) * layers + 4  # AC: forward's 4 again
        small = 2 * (2 * (2 * layers + 1) * cfg.dim * 4 + 4 * tokens * 4)
        comm["TP collectives"] = (units * tokens * cfg.dim * e + small) * (tp - 1) // tp
    if pp > 1:
        comm["PP send/recv"] = tokens * cfg.dim * e  # rank 0, the first stage, sends h; inner stages send 2 x
    if cp > 1:
        block = 2 * b * t * cfg.n_kv_heads * cfg.head_dim  # elements of one (k, v) message
        comm["CP ring k/v"] = ((cp - 1) * 2 * e + cp * 4) * block * layers
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
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"--world {world!r}: the number of ranks is a whole number >= 1")
    every = [(layout, estimate(cfg, layout, batch, seq_len, dtype)) for layout in layouts(world, cfg, seq_len, batch)]
    if not every:
        raise ValueError(f"no (pp, dp_shard, cp, tp) grid of {world} ranks splits this model and a batch of {batch}: "
                         f"make the batch a multiple of a divisor of {world} (or of {world} itself)")
    rows = [(sum(est.comm.values()), layout, est) for layout, est in every if budget is None or est.memory <= budget]
    if not rows:
        least = min(est.memory for _, est in every)
        raise ValueError(f"no layout of {world} ranks fits {budget / 2**30:.2f} GiB per rank: the smallest needs "
                         f"{least / 2**30:.2f} GiB; raise the budget, add ranks, or shrink the batch or sequence")
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
    try:
        cfg = LlamaConfig.from_name(args.config)
        budget = args.budget_gib * 2**30 if args.budget_gib else None
        print(table(cfg, args.world, args.batch, args.seq_len, budget, getattr(torch, args.dtype)))
    except (KeyError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
