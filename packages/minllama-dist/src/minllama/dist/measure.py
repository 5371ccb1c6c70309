"""One training step in a layout, and what it really cost this rank: the measured side of ``estimate.py``.

    held       bytes of the local shards of parameters, gradients and AdamW state (DTensors: ``to_local``)
    activations  bytes of the unique storages autograd saved for backward (``saved_tensors_hooks``), weights
               excluded, read after the step: FSDP2's gathered weights are saved too, but it frees their storage
               when it reshards, so they count 0. Pipelines run GPipe here, so that the sum over micro-batches is
               also what is held at once. One warm-up step runs first, unmeasured.
    sent       bytes this rank sent, by kind of collective (``traffic.CountedTraffic``)

Every rank calls ``measure_step`` with the same arguments inside an initialized process group of
``layout.world`` ranks. Layouts are built the way ``apps/train.py`` builds them: TP and FSDP on the 4-D mesh
(``parallelize_llama``), pipelines with ``build_pipeline``, context parallel as rings with FSDP over every rank.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from minllama.core import LlamaConfig, MinimalLlama

from .context_parallel import apply_context_parallel, context_parallel_groups, context_parallel_loss
from .estimate import Layout
from .fsdp import apply_fsdp, materialize, meta_model
from .launch import data_parallel_mesh
from .mesh import build_mesh, plan_mesh
from .parallelize import parallelize_llama
from .pipeline import build_pipeline, pipeline_forward_backward, pipeline_mesh
from .traffic import CountedTraffic
from .training import lm_loss


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


class SavedActivations:
    """``with SavedActivations() as saved: loss = ...; loss.backward()`` then ``saved.bytes(model)``."""

    def __init__(self):
        self.storages = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        inner = t
        while isinstance(inner, (DTensor, AsyncCollectiveTensor)):  # wrappers: the tensor inside holds the storage
            inner = inner._local_tensor if isinstance(inner, DTensor) else inner.elem
        s = inner.untyped_storage()
        self.storages[s.data_ptr()] = s
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def bytes(self, model) -> int:
        weights = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *model.buffers()]]
        own = {t.untyped_storage().data_ptr() for t in weights}
        return sum(s.nbytes() for ptr, s in self.storages.items() if ptr not in own)


def measure_step(cfg: LlamaConfig, layout: Layout, batch: int, seq_len: int, microbatches: int = 2) -> dict:
    """Build ``layout`` over the current process group, run one step on random tokens, return this rank's costs."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    plan_mesh(world, tp=layout.tp, pp=layout.pp, cp=layout.cp, dp_shard=layout.dp_shard, cfg=cfg, seq_len=seq_len)
    if (layout.pp > 1) + (layout.cp > 1) + (layout.tp > 1) > 1:
        raise ValueError(f"{layout.name}: measure_step builds each of pp, cp and tp with FSDP, not with each other "
                         f"(apps/train.py trains the compositions): measure one of them at a time; the estimate "
                         f"covers every layout")
    ac = layout.activation_checkpointing
    torch.manual_seed(1000 + rank)
    tokens = torch.randint(0, cfg.vocab_size, (batch // layout.dp_shard, seq_len + 1))  # this rank's rows
    traffic, saved = CountedTraffic(), SavedActivations()
    if layout.pp > 1:
        torch.manual_seed(0)
        full = MinimalLlama(cfg)
        full.init_weights()
        pipe = build_pipeline(full, pipeline_mesh(device, layout.pp), device, "gpipe", microbatches, ac)
        model = pipe.model
        step = lambda: pipeline_forward_backward(pipe, tokens)  # noqa: E731
    elif layout.cp > 1:
        model = meta_model(cfg)
        group, _, _ = context_parallel_groups(layout.cp)
        cp = apply_context_parallel(model, group)
        apply_fsdp(model, data_parallel_mesh(device), activation_checkpointing=ac)
        materialize(model, device)

        def step():
            with cp.sequence(seq_len):
                context_parallel_loss(model, cp, tokens).backward()
    else:
        model = meta_model(cfg)
        parallelize_llama(model, build_mesh(plan_mesh(world, tp=layout.tp), "cpu"), activation_checkpointing=ac)
        materialize(model, device)

        def step():  # vocabulary-sharded logits: the loss and its backward inside loss_parallel (tp_lm_loss)
            with loss_parallel() if layout.tp > 1 else contextlib.nullcontext():
                lm_loss(model(tokens[:, :-1]), tokens).backward()
    step()  # warm-up: lazy initialization (FSDP), the pipeline's shape inference, DTensor's sharding caches
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    with traffic, saved:
        step()
    step_s = time.perf_counter() - started  # the measured forward + backward
    params = list(model.parameters())
    grads = local_bytes(p.grad for p in params if p.grad is not None)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    optim = local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": local_bytes(params), "grads": grads, "optim": optim, "activations": saved.bytes(model),
            "sent": dict(traffic.sent), "step_s": step_s}
