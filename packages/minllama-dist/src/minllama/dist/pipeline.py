"""Pipeline parallelism: each rank holds a few consecutive *layers* and passes activations to the next rank.

    rank 0: tokens -> embedding -> layers 0..k-1 --send h (B, T, dim)--> rank 1: layers k..n-1 -> norm -> head -> loss
            <------------------------------------ receive dL/dh ----------

A rank stores only its layers (parameters, gradients, optimizer state), and what travels between ranks is one
activation per micro-batch, not weights: that is why pipelining spans slow links (between machines) well. The price
is the *bubble*: rank 1 waits until rank 0 has finished the first micro-batch. Splitting the batch into m
micro-batches and keeping every stage busy on a different one shrinks the idle part to (p-1)/(m+p-1) of the step.
PyTorch's ``torch.distributed.pipelining`` runs the schedule (``ScheduleGPipe``, ``Schedule1F1B``,
``ScheduleInterleaved1F1B``): which micro-batch each stage computes when, and the sends and receives between.

The model code is untouched: ``cut_stage`` builds a ``LlamaStage`` *from* a ``MinimalLlama``'s own modules, under the
same attribute names, so every parameter keeps its name (``layers.3.attention.wq.weight`` stays that on the rank
that owns layer 3). A distributed checkpoint written by a pipeline therefore loads into one process, FSDP, or
another pipeline layout, and back.

Inside a stage the other splits apply as they do to a whole model (``build_pipeline``): tensor parallel over the
"tp" ranks that hold the stage, ring attention over its "cp" ranks (PP x CP: each stage is a ring, each pipeline
carries one ring position's tokens; README section 4e), FSDP over the rest, and bf16 mixed precision.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from minllama.core import LlamaConfig, MinimalLlama
from minllama.core.model import rope_cache, rope_frequencies

from .context_parallel import ContextParallel, apply_context_parallel, loss_share
from .fsdp import apply_activation_checkpointing
from .mesh import build_mesh, plan_mesh
from .parallelize import shard_for_training
from .training import lm_loss

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved": 2}


class LlamaStage(nn.Module):
    """Consecutive layers of a ``MinimalLlama``, with the embedding if they are the first, and the final norm and
    head if they are the last. Built by ``cut_stage``; holds the full model's modules under the full model's names.

    ``layers`` is an ``nn.ModuleDict`` keyed by the *original* layer index ("2", "3"), so the state-dict keys are
    ``layers.2....``, exactly those of the full model (a ModuleList would renumber them from 0).
    """

    def __init__(self, config: LlamaConfig, tok_embeddings: nn.Module | None, layers: dict[int, nn.Module],
                 norm: nn.Module | None, output: nn.Module | None, rope: Tensor):
        super().__init__()
        self.config = config  # the *full* model's config: checkpoints record it and compare it on load
        self.tok_embeddings = tok_embeddings
        self.layers = nn.ModuleDict({str(i): block for i, block in layers.items()})
        self.norm, self.output = norm, output
        self.tp_size = 1  # set by parallelize.shard_for_training: between blocks each rank holds T/tp positions
        self.context_parallel: ContextParallel | None = None  # the ring (build_pipeline sets it under PP x CP)
        self.register_buffer("rope", rope, persistent=False)  # (max_seq_len, head_dim/2, 2), in no checkpoint

    def forward(self, x: Tensor) -> Tensor:
        """First stage: tokens (B, T) -> hidden (B, T, dim). Middle: hidden -> hidden. Last: hidden -> logits
        (B, T, vocab). The same computation as ``MinimalLlama.forward`` without a cache: causal attention over
        positions 0..T-1 (``mask=None`` is SDPA's causal path, as in the full model).

        Under tensor parallel (sequence parallel between blocks) a stage receives and sends its rank's slice of
        the sequence, (B, T/tp, dim): attention all-gathers the T positions, so RoPE must cover all T of them.
        Under context parallel a stage holds its ring rank's L tokens (B, L, dim) (or L/tp under TP too), and
        attention runs the ring: RoPE rotates them at their global positions (``positions``)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x  # (B, T/tp, dim)
        rope = self.rope[self.positions(x)]  # (T, head_dim/2, 2)
        for block in self.layers.values():
            h = block(h, rope)
        if self.norm is not None:
            h = self.output(self.norm(h))  # (B, T, vocab)
        return h

    def positions(self, x: Tensor) -> Tensor:
        """The global positions of the tokens this rank's attention sees, (T,): 0 .. T-1, T the whole row (a stage
        after the first receives T/tp of them under tensor parallel); or, while a context-parallel sequence is
        active, this ring rank's L positions (its two load-balanced chunks, padding clamped into the table)."""
        cp = self.context_parallel
        if cp is not None and cp.layout is not None:
            return cp.rope_positions(cp.layout, self.config.max_seq_len, x.device)  # (L,)
        return torch.arange(x.shape[1] * (1 if self.tok_embeddings is not None else self.tp_size), device=x.device)

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE table (after ``to_empty``), as ``MinimalLlama.reset_rope`` does."""
        device = device or next(self.parameters()).device
        self.rope = rope_cache(rope_frequencies(self.config), self.config.max_seq_len).to(device)


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Stage s owns layers s*n/S .. (s+1)*n/S - 1. Equal counts: the slowest stage sets the pace of all."""
    if n_layers % n_stages:
        raise ValueError(f"{n_layers} layers do not split evenly into {n_stages} pipeline stages: choose a number "
                         f"of stages that divides {n_layers} ({_divisors(n_layers)})")
    per = n_layers // n_stages
    return [range(s * per, (s + 1) * per) for s in range(n_stages)]


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def cut_stage(model: MinimalLlama, layer_ids, first: bool, last: bool) -> LlamaStage:
    """The part of ``model`` that owns ``layer_ids`` (plus the embedding when ``first``, norm + head when ``last``).
    Shares ``model``'s modules (no copy): drop ``model`` afterwards and the other layers are freed."""
    if model.config.tie_embeddings and not (first and last):
        raise ValueError("a tied head (tie_embeddings=True) is one parameter shared by the first and the last "
                         "stage, which pipeline parallelism puts on different ranks: use a config without tied "
                         "embeddings, or FSDP (apply_fsdp) instead of --pp")
    return LlamaStage(model.config, model.tok_embeddings if first else None,
                      {i: model.layers[i] for i in layer_ids}, model.norm if last else None,
                      model.output if last else None, model.rope)


def pipeline_mesh(device: torch.device, pp: int) -> DeviceMesh:
    """A 2-D mesh ("pp", "dp_shard") over every rank: pp stages deep, world/pp data-parallel replicas wide.

    Rank = pp_rank * dp + dp_rank. With 4 ranks and pp=2 the mesh is [[0, 1], [2, 3]]: ranks 0 and 1 hold stage 0
    (sharded between them by FSDP), ranks 2 and 3 stage 1; (0, 2) and (1, 3) are the two pipelines, each fed its
    own half of the batch.
    """
    world = dist.get_world_size()
    if pp < 1 or world % pp:
        raise ValueError(f"{world} ranks do not split into pipelines of {pp} stages: run a multiple of --pp ranks "
                         f"(or choose --pp among {_divisors(world)})")
    return init_device_mesh(device.type, (pp, world // pp), mesh_dim_names=("pp", "dp_shard"))


def check_pipeline_args(cfg: LlamaConfig, world: int, pp: int, schedule: str, batch_size: int,
                        microbatches: int, tp: int = 1, cp: int = 1) -> None:
    """Refuse, with one clear ValueError, a pipeline that cannot be built (before any process group work)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if cfg.tie_embeddings:
        raise ValueError(f"{cfg.name} ties the head to the embedding, one parameter that the first and last stages "
                         "would both need: pipeline parallelism needs a config with untied embeddings")
    if pp < 1:
        raise ValueError(f"--pp {pp}: a pipeline has at least 1 stage per rank; use --pp 1 (no pipeline) or more")
    per_rank = STAGES_PER_RANK[schedule]
    if cfg.n_layers % (pp * per_rank):
        options = [k for k in range(1, cfg.n_layers + 1) if cfg.n_layers % (k * per_rank) == 0]
        raise ValueError(f"{cfg.n_layers} layers do not split into {pp * per_rank} pipeline stages ({schedule}: "
                         f"{per_rank} per rank x --pp {pp}): choose --pp among {options or 'none: use 1f1b'}")
    inner = [(name, n) for name, n in (("cp", cp), ("tp", tp)) if n > 1]  # the splits inside each stage
    if world % (pp * cp * tp):
        what = f"{pp} stages" + "".join(f" x --{name} {n}" for name, n in inner) + " ranks each" * bool(inner)
        raise ValueError(f"{world} ranks do not split into pipelines of {what}: run a multiple of --pp"
                         f"{''.join(f' x --{name}' for name, _ in inner)} = {pp * cp * tp} ranks")
    dp = world // (pp * cp * tp)
    if microbatches < 1 or batch_size % (dp * microbatches):
        raise ValueError(f"--batch-size {batch_size} does not split into {dp} data-parallel replica(s) x "
                         f"{microbatches} micro-batches: use a batch size that is a multiple of {dp * microbatches}")
    if schedule == "interleaved" and microbatches % pp:
        raise ValueError(f"the interleaved schedule runs micro-batches in rounds of {pp} (one per stage): use a "
                         f"multiple of --pp {pp} micro-batches (not {microbatches})")


@dataclass
class Pipeline:
    """This rank's share of a pipeline-parallel model and the schedule that runs it.

    model: every module this rank owns, under the full model's names: give its parameters to the optimizer and
        pass it to ``save_checkpoint`` / ``CheckpointManager`` / ``load_checkpoint`` like any model.
    stages: the ``PipelineStage``s this rank runs (1, or 2 for the interleaved schedule; they share ``model``'s
        modules). mesh: the ("pp", "dp_shard") mesh, or build_mesh's (pp, dp_shard, cp, tp) one.
    context_parallel: the ring of this rank's stage under PP x CP (None without context parallel).
    """

    model: LlamaStage
    stages: list[PipelineStage]
    schedule: object
    mesh: DeviceMesh
    context_parallel: ContextParallel | None = None

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp_shard"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp_shard"].size()

    @property
    def tp_size(self) -> int:
        return self.mesh["tp"].size() if "tp" in self.mesh.mesh_dim_names else 1

    @property
    def cp_size(self) -> int:
        return 1 if self.context_parallel is None else self.context_parallel.world


def build_pipeline(model: MinimalLlama, mesh: DeviceMesh, device: torch.device, schedule: str = "1f1b",
                   microbatches: int = 4, activation_checkpointing: bool = False,
                   param_dtype: torch.dtype | None = None) -> Pipeline:
    """Cut ``model`` into stages, keep this rank's, shard it over "dp_shard" (FSDP2, when that dimension has more
    than one rank) and build the schedule. Every rank calls it with the same, full ``model`` (e.g. drawn from one
    seed); the other ranks' layers are dropped with ``model``.

    Stage placement: with S = pp x stages-per-rank stages, rank r of the pipeline runs stages r, r + pp, ...
    (the interleaved schedule's "looped" layout: rank 0 owns layers of the first and the third quarter).

    ``mesh`` may also be ``build_mesh``'s (pp, dp_shard, cp, tp) mesh: each stage is then tensor parallel over
    "tp" (``parallelize.shard_for_training``: sequence parallel between blocks, so the activations sent between
    stages are each rank's (B/m, T/tp, dim) slice; the last stage's logits stay vocabulary-sharded and the loss is
    loss-parallel), then FSDP over "dp_shard": TP first, as ``parallelize_llama`` does. With cp > 1 each stage's
    attention runs the ring over "cp" (the ranks that hold the same stage at other ring positions): a pipeline
    carries one ring rank's L tokens (B/m, L, dim) from stage to stage, its last stage scores them with the ring
    rank's share of the loss, and FSDP shards and averages over dp_shard x cp. The stages learn the shapes they
    receive from the first micro-batch (PyTorch's runtime shape inference), so the local shapes need not be
    spelled out.

    ``param_dtype`` (e.g. torch.bfloat16): the stages compute in it and send activations in it; FSDP's
    ``MixedPrecisionPolicy`` keeps the sharded master weights and AdamW in fp32 and sums the gradients of the
    micro-batches and replicas in fp32 (FSDP is then applied even over a "dp_shard" of one rank, for the casts).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    runner = SCHEDULES[schedule]
    if "scale_grads" not in inspect.signature(runner.__init__).parameters:
        # older schedules summed the micro-batches' gradients (m times the one-process gradient), silently
        raise RuntimeError(f"PyTorch {torch.__version__}'s pipeline schedules do not average gradients over "
                           "micro-batches (no scale_grads): minllama.dist.pipeline needs PyTorch 2.7 or newer")
    pp_mesh, dp_mesh, ring = mesh["pp"], mesh["dp_shard"], None
    if "cp" in mesh.mesh_dim_names and mesh["cp"].size() > 1:
        # every attention becomes ring-capable over this rank's "cp" group (the same stage at the other ring
        # positions); each ring rank's loss is a share of the same rows' loss: gradients average over dp x cp
        ring = apply_context_parallel(model, mesh["cp"].get_group())
        dp_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # as parallelize_llama does
    pp, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    n_stages = pp * STAGES_PER_RANK[schedule]
    ranges = split_layers(model.config.n_layers, n_stages)
    mine = list(range(pp_rank, n_stages, pp))  # this rank's stage indices
    chunks = [cut_stage(model, ranges[s], s == 0, s == n_stages - 1) for s in mine]
    everything = [i for s in mine for i in ranges[s]]
    owned = chunks[0] if len(chunks) == 1 else cut_stage(model, everything, 0 in mine, n_stages - 1 in mine)
    for part in [*chunks, owned]:  # (the modules are shared; each part also holds its own reference to the rope)
        part.to(device)
        part.context_parallel = ring
    if "tp" in mesh.mesh_dim_names and mesh["tp"].size() > 1:
        shard_for_training(owned, mesh["tp"])  # the modules of every chunk are owned's: sharded once
        for chunk in chunks:
            chunk.tp_size = owned.tp_size
    if activation_checkpointing:  # keep only each block's input per micro-batch; recompute the rest in backward
        for block in owned.layers.values():
            apply_activation_checkpointing(block)
    if dp_mesh.size() > 1 or param_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in owned.layers.values():  # one FSDP group per block, as apply_fsdp does
            # keep the gathered weights from forward to backward: a block runs once per micro-batch, resharding
            # after each forward would all-gather it m times more
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
        for chunk in chunks:  # the embedding / norm + head of this stage
            fully_shard(chunk, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    group = pp_mesh.get_group()
    stages = [PipelineStage(chunk, s, n_stages, device, group=group) for chunk, s in zip(chunks, mine)]
    loss_fn = lm_loss if ring is None else functools.partial(_ring_share_loss, ring)
    sched = runner(stages if len(stages) > 1 else stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    return Pipeline(owned, stages, sched, mesh, ring)


def _ring_share_loss(ring: ContextParallel, logits: Tensor, targets: Tensor) -> Tensor:
    """The last stage's loss of one micro-batch under PP x CP: this ring rank's share (``loss_share``). logits
    (b, L, vocab), targets (b, L) from ``ContextParallel.shard_tokens``; T is the active sequence's length."""
    return loss_share(logits, targets, ring.world, ring.layout.seq_len)


def clip_grad_norm_(pipe: Pipeline, max_norm: float) -> Tensor:
    """Clip by the norm over *all* stages' gradients, as one process would: each rank has only its layers', so
    the squared norms are summed over the "pp" group (FSDP's DTensor norm has already summed over "dp_shard")."""
    params = [p for p in pipe.model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    squared = norm.pow(2)
    dist.all_reduce(squared, group=pipe.mesh["pp"].get_group())
    total = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def pipeline_forward_backward(pipe: Pipeline, tokens: Tensor) -> Tensor | None:
    """Forward and backward of every micro-batch of ``tokens`` (b, T+1), this data-parallel replica's rows, in the
    schedule's order; afterwards each rank's parameters hold their gradients (averaged over micro-batches and, with
    FSDP, over replicas: the gradient of the mean loss over the global batch). Every stage of one pipeline gets
    the same rows: the first feeds them in, the last scores against them. Returns the replica's mean loss on the
    rank that holds the last stage, None elsewhere (under PP x CP: this ring rank's share of it).

    Under PP x CP every stage runs inside the ring's ``sequence``: the ranks of a ring hold the same stage, and
    each pipeline carries one ring position's tokens from the first stage to the last."""
    ring, tp = pipe.context_parallel, pipe.tp_size
    if ring is None and (tokens.shape[1] - 1) % tp:
        raise ValueError(f"{tokens.shape[1] - 1} tokens per row do not split over tp={tp} ranks: "
                         f"sequence parallel needs a --seq-len that is a multiple of {tp}")
    losses: list[Tensor] = []
    # newer PyTorch can skip gathering the last stage's logits into one tensor: nobody reads them here
    skip = {"return_outputs": False} if "return_outputs" in inspect.signature(pipe.schedule.step).parameters else {}
    # the ring's layout stays active through the whole schedule: backward (and activation checkpointing's
    # recomputed forward) runs the ring again; vocabulary-sharded logits (tp > 1): the loss *and its backward* run
    # inside loss_parallel (parallelize.py)
    with (ring.sequence(tokens.shape[1] - 1) if ring else contextlib.nullcontext(),
          loss_parallel() if tp > 1 else contextlib.nullcontext()):
        if ring is None:
            inputs, target = tokens[:, :-1], tokens  # (b, T), (b, T+1): lm_loss shifts the targets itself
        else:
            inputs, target = ring.shard_tokens(tokens, tp)  # this ring rank's (b, L) each, targets -100 at padding
        first = (inputs,) if pipe.stages[0].is_first else ()  # only the first stage reads tokens
        pipe.schedule.step(*first, target=target, losses=losses, **skip)
    losses = [loss.to_local() if isinstance(loss, DTensor) else loss for loss in losses]  # replicated over tp
    return torch.stack(losses).mean().detach() if losses else None  # equal micro-batches: mean of means


def pipeline_train_step(pipe: Pipeline, optimizer, tokens: Tensor, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step, the pipelined ``train_step``; returns the loss over the global batch, on every rank."""
    loss = pipeline_forward_backward(pipe, tokens)
    if max_grad_norm is not None:
        clip_grad_norm_(pipe, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss if loss is not None else torch.zeros((), device=tokens.device)
    # only the last stage's ranks hold a loss: one per replica, ring rank (a share) and tp rank (a copy)
    dist.all_reduce(loss)
    return float(loss) / (pipe.dp_size * pipe.cp_size * pipe.tp_size)


def pipeline_for_training(cfg: LlamaConfig, seed: int, device: torch.device, pp: int, schedule: str,
                          microbatches: int, batch_size: int, activation_checkpointing: bool = False,
                          tp: int = 1, cp: int = 1, param_dtype: torch.dtype | None = None) -> Pipeline:
    """What ``apps/train.py --pp`` calls: check the options, build the mesh, draw the initial weights and cut.

    Every rank draws the *full* model from ``seed`` on the CPU (the numbers of one process, ``init_from_rank0``'s
    too, so runs on any layout start equal) and keeps its stages: fine at tutorial sizes; a large model would be
    built on the meta device and filled from a checkpoint (``load_checkpoint`` reads just this rank's tensors)."""
    world = dist.get_world_size()
    check_pipeline_args(cfg, world, pp, schedule, batch_size, microbatches, tp, cp)
    torch.manual_seed(seed)
    full = MinimalLlama(cfg)
    full.init_weights()
    mesh = pipeline_mesh(device, pp) if tp == cp == 1 else build_mesh(plan_mesh(world, pp=pp, cp=cp, tp=tp),
                                                                      device.type)
    return build_pipeline(full, mesh, device, schedule, microbatches, activation_checkpointing, param_dtype)
