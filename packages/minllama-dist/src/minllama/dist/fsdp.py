"""FSDP2: every rank keeps 1/N of each parameter, gathers a block's full weights just before using them, and drops
them again right after.

    forward of block i:   all-gather(block i's shards) -> full weights -> compute -> free the full weights
    backward of block i:  all-gather again -> compute gradients -> reduce-scatter -> each rank keeps 1/N of the
                          *averaged* gradient, which is exactly the slice its optimizer updates

So parameters, gradients and optimizer state all cost 1/N per rank, and only one or two blocks are ever full.
``fully_shard`` (PyTorch's FSDP2) does the work; this file decides *what* to group (one group per transformer
block, plus the root for the embedding, final norm and head) and *when* to gather (prefetching, below).
The model code is untouched: ``MinimalLlama`` never knows it is sharded.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from minllama.core import LlamaConfig, MinimalLlama
from minllama.core.build import materialize, meta_model  # noqa: F401  (part of this package's API)


def apply_activation_checkpointing(block: nn.Module) -> None:
    """Keep only the block's input in the forward pass and recompute its activations during backward.

    Memory for activations drops from O(layers x activations per block) to O(layers x input + one block), for
    about one extra forward per step. Done by replacing the instance's ``forward``: the state-dict names stay.
    """
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def apply_fsdp(model: MinimalLlama, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               prefetch: int = 1, activation_checkpointing: bool = False) -> MinimalLlama:
    """Shard ``model`` in place over ``mesh`` and return it.

    param_dtype: the dtype blocks compute in (e.g. torch.bfloat16); the sharded master weights and the optimizer
        stay in their own dtype (fp32). reduce_dtype: the dtype gradients are averaged in (fp32: summing N bf16
        gradients would lose their low bits).
    reshard_after_forward: free each block's full weights after its forward (gather again in backward): lowest
        memory. False keeps them until backward (one all-gather fewer per block, more memory).
    prefetch: how many blocks ahead to all-gather explicitly (0: only when a block starts, no overlap).
    """
    if activation_checkpointing:
        for block in model.layers:
            apply_activation_checkpointing(block)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers)
    for block in blocks:  # one communication group per block: only one block's weights are full at a time
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root group holds what is left: embedding, final norm and output head (a tied head is one parameter).
    # Its weights are needed first (embedding) and last (head): keeping them gathered saves two all-gathers.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if prefetch > 0:
        set_prefetch(blocks, prefetch)
    return model


def set_prefetch(blocks: list[nn.Module], depth: int = 1) -> None:
    """Ask block i to start the all-gather of the next ``depth`` blocks when it starts (forward), and of the
    previous ``depth`` blocks when its backward starts.

    Collectives run on their own CUDA stream (gloo: their own thread), so the weights of block i+1 travel while
    block i computes, and are there when block i+1 starts. Left alone, FSDP2 issues a block's all-gather when that
    block's forward begins: on a GPU the CPU usually runs ahead of the kernels, so it overlaps anyway, but when the
    CPU is the bottleneck (small blocks, CPU training) it does not. Being explicit makes the overlap, and its memory
    cost of ``depth`` extra gathered blocks, a decision you can see and tune.
    """
    for i, block in enumerate(blocks):
        following = blocks[i + 1:i + 1 + depth]
        preceding = blocks[max(0, i - depth):i][::-1]  # backward walks the blocks in reverse
        if following:
            block.set_modules_to_forward_prefetch(following)
        if preceding:
            block.set_modules_to_backward_prefetch(preceding)


def rebuild_rope(model: MinimalLlama) -> None:
    """The rope table is a non-persistent buffer (never in checkpoints): recompute it after ``to_empty``."""
    model.reset_rope()
