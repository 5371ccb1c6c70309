"""Tensor parallel *training*: sequence parallel between the blocks, a vocabulary-sharded embedding and head, and a
cross-entropy that never gathers the logits; then FSDP on top, on the other dimension of a 2-D mesh.

``tp.py`` splits only the blocks (enough for generation). Training on N ranks with that plan would keep a full
copy of the residual stream, of every norm's activations and of the (B, T, vocab) logits on each rank: the
largest activations of a step, replicated N times. Here nothing is replicated between the blocks:

    tokens (B, T)                 replicated
      tok_embeddings  [vocab/N rows each]   RowwiseParallel: partial sums -> reduce-scatter along T
    h (B, T/N, dim)               Shard(1): each rank its slice of the SEQUENCE (sequence parallel)
      attention_norm              SequenceParallel: an RMSNorm is per token, so it runs on the local slice
      attention entry             all-gather along T -> (B, T, dim): RoPE and the causal mask see all positions
      wq, wk, wv [heads/N]        ColwiseParallel: each rank its heads, attention with no communication
      wo                          RowwiseParallel: partial sums -> reduce-scatter along T -> (B, T/N, dim)
    h + attn  (B, T/N, dim)       the residual add is local
      ffn_norm, w1/w3, w2         the same pattern: norm on the slice, all-gather, columns, rows, reduce-scatter
      ...                         (every block)
      norm                        SequenceParallel
      output [vocab/N rows each]  ColwiseParallel: all-gather along T, logits (B, T, vocab/N): Shard(-1)
    loss                          loss_parallel: softmax statistics reduced over ranks, logits never gathered

An all-reduce is a reduce-scatter followed by an all-gather: tp.py's one all-reduce per sub-layer becomes a
reduce-scatter at its exit and an all-gather at the next entry. Same bytes on the wire, but between the two the
activations are 1/N each.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

from minllama.core import LlamaConfig, MinimalLlama

from .fsdp import apply_fsdp
from .training import lm_loss

# Attention.forward(x, rope, mask, cache, slots): only x is sharded; the others are the same on every rank.
_ATTENTION_INPUTS = (Shard(1), None, None, None, None)
_ATTENTION_WANTS = (Replicate(), None, None, None, None)

BLOCK_PLAN_SP = {
    "attention_norm": SequenceParallel(),  # (B, T/N, dim) in, DTensor Shard(1) out
    "attention": PrepareModuleInput(input_layouts=_ATTENTION_INPUTS, desired_input_layouts=_ATTENTION_WANTS,
                                    use_local_output=True),  # all-gather: (B, T, dim), plain tensor for the views
    "attention.wq": ColwiseParallel(),  # (B, T, n_heads/N * head_dim)
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(output_layouts=Shard(1)),  # reduce-scatter: (B, T/N, dim)
    "ffn_norm": SequenceParallel(),
    "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                       use_local_output=True),
    "feed_forward.w1": ColwiseParallel(),  # (B, T, hidden_dim/N)
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),  # (B, T/N, dim)
}

ROOT_PLAN_SP = {
    # vocab rows split; each rank looks up the tokens in its rows (others: 0) and the sum is reduce-scattered
    "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),  # (B, T/N, dim)
    "norm": SequenceParallel(),
    # use_local_output=False: the logits stay a DTensor Shard(-1), which is what loss_parallel consumes
    "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
}


def check_tensor_parallel(cfg: LlamaConfig, tp: int) -> None:
    """Raise one ValueError naming the first size that does not split over ``tp`` ranks, and the tp that would.
    (The sequence must split too, for sequence parallel: ``mesh.plan_mesh`` checks it with the other degrees.)"""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"--tp {tp!r}: the tensor-parallel degree is a whole number >= 1")
    sizes = {"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "hidden_dim": cfg.hidden_dim,
             "vocab_size": cfg.vocab_size}
    for what, count in sizes.items():
        if count % tp:
            fits = [k for k in range(1, cfg.n_kv_heads + 1) if all(c % k == 0 for c in sizes.values())]
            raise ValueError(f"{what}={count} does not split over --tp {tp} ranks: tensor parallel training needs "
                             f"the head counts, hidden_dim and vocab_size to be multiples of tp (this model: "
                             f"--tp in {fits})")


def apply_tensor_parallel_training(model: MinimalLlama, mesh: DeviceMesh) -> MinimalLlama:
    """Shard ``model`` over the 1-D ``mesh`` (the "tp" dimension) for training, in place, and return it.

    After this, ``model(tokens)`` takes the full (B, T) tokens on every rank of the mesh (T a multiple of the mesh
    size) and returns logits as a DTensor sharded over the vocabulary; compute the loss with ``tp_lm_loss`` (or
    inside ``loss_parallel()``), and call ``backward`` inside it too.

    The result trains; it does not decode with a KV cache (one new token cannot be split along the sequence):
    to generate, load its checkpoint into a model split by ``tp.apply_tensor_parallel``, or pad the window to a
    multiple of tp as ``apps/train.py``'s ``sample`` does.

    A tied head (``tie_embeddings``) is kept tied: the embedding (rowwise) and the head (columnwise) both shard
    the (vocab, dim) matrix by rows, so one DTensor serves both; it is re-tied after ``parallelize_module`` gave
    each module its own copy.
    """
    shard_for_training(model, mesh)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # same placement (Shard(0) of vocab): one parameter
    model.register_forward_pre_hook(_sequence_must_split, with_kwargs=True)
    return model


def shard_for_training(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """The plan above applied to ``module``, in place: a ``MinimalLlama``, or a pipeline stage (``LlamaStage``:
    some of the layers, the embedding only in the first stage, the norm and head only in the last). The root plan
    is applied to the parts the module has; ``module.tp_size`` records the degree (a stage needs it to know the
    full sequence length from the (B, T/tp, dim) slice it receives)."""
    cfg, n = module.config, mesh.size()
    check_tensor_parallel(cfg, n)
    parallelize_module(module, mesh, {k: v for k, v in ROOT_PLAN_SP.items() if getattr(module, k, None) is not None})
    layers = module.layers.values() if isinstance(module.layers, nn.ModuleDict) else module.layers
    for block in layers:
        parallelize_module(block, mesh, BLOCK_PLAN_SP)
        block.attention.n_heads = cfg.n_heads // n  # the views in Attention.project see the local heads
        block.attention.n_kv_heads = cfg.n_kv_heads // n
    module.tp_size = n
    return module


def _sequence_must_split(model: MinimalLlama, args: tuple, kwargs: dict) -> None:
    """Refuse, before any collective, what sequence parallel cannot split (ranks would otherwise exchange slices
    of different sizes and abort): a sequence that is not a multiple of tp, and a KV cache (one new token)."""
    tokens = args[0] if args else kwargs["tokens"]
    if kwargs.get("cache") is not None or (len(args) > 4 and args[4] is not None):
        raise ValueError("a model split by apply_tensor_parallel_training does not decode with a KV cache (one new "
                         "token cannot be split along the sequence): generate with tp.apply_tensor_parallel")
    if tokens.shape[1] % model.tp_size:
        raise ValueError(f"{tokens.shape[1]} tokens per row do not split over tp={model.tp_size} ranks: sequence "
                         f"parallel needs a multiple of {model.tp_size} (use a --seq-len that is one, or "
                         f"pad_to_multiple)")


def parallelize_llama(model: MinimalLlama, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
                      activation_checkpointing: bool = False) -> MinimalLlama:
    """Apply the splits of a (pp, dp_shard, cp, tp) ``mesh`` (``mesh.build_mesh``) to ``model``, in place, in
    torchtitan's order: tensor parallel on ``mesh["tp"]`` first, then context parallel on ``mesh["cp"]``, then
    FSDP2 on the data ranks.

    The order matters: FSDP shards whatever parameters it finds, so it must find the TP DTensors (a weight that is
    Shard(0) over tp becomes Shard(0) over dp_shard *of* that, a 2-D DTensor); TP applied after FSDP would split
    FSDP's flat shards, not the heads. Activation checkpointing and mixed precision are FSDP's (``apply_fsdp``).
    FSDP runs even over a dp_shard of 1 rank: mixed precision and the DTensor state dicts then work the same way
    on every mesh.

    Context parallel x tensor parallel (cp > 1): both split the sequence, in this order. CP first: the ring of
    ``mesh["cp"]`` gives each of its ranks L = T/cp tokens (its two load-balanced chunks). SP then splits those L
    between the tp ranks between blocks (L/tp each, so L must be a multiple of tp); attention all-gathers the L
    tokens over tp, and the ring runs on each tp rank's local heads (n_heads/tp, n_kv_heads/tp) with the tp ranks
    of the same index in the other ring positions. Every cp rank computes a share of the loss of the same rows, so
    the gradients are averaged over dp_shard *and* cp: FSDP shards over the two flattened into one "dp_shard_cp"
    dimension (as torchtitan does; ``DeviceMesh._flatten`` is PyTorch's, private, way to get that 1-D view).
    The ring is ``model.context_parallel``: train with ``context_parallel.cp_train_step(model, opt, tokens,
    model.context_parallel)``. Pipeline parallel (pp > 1) is ``pipeline.build_pipeline``'s.
    """
    if mesh["pp"].size() > 1:
        raise NotImplementedError(f"pp={mesh['pp'].size()}: parallelize_llama applies tp, cp and dp_shard; a "
                                  f"pipeline is built by pipeline.build_pipeline (which takes this mesh)")
    if mesh["tp"].size() > 1:
        apply_tensor_parallel_training(model, mesh["tp"])
    data_mesh = mesh["dp_shard"]
    if mesh["cp"].size() > 1:
        from .context_parallel import apply_context_parallel  # (it imports training, which imports nothing here)

        model.context_parallel = apply_context_parallel(model, mesh["cp"].get_group())
        data_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return apply_fsdp(model, data_mesh, param_dtype=param_dtype, activation_checkpointing=activation_checkpointing)


def tp_lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of vocabulary-sharded logits (B, T, vocab/N per rank), tokens (B, T+1): the value
    (to evaluate; for training, ``train_step`` runs the loss *and its backward* inside ``loss_parallel()``, which
    the backward needs as much as the forward).

    Each rank holds a slice of every row of logits. The log-softmax needs the row's max and sum over the whole
    vocabulary: ``loss_parallel`` all-reduces those two numbers per row (and the picked target logit) instead of
    all-gathering (B, T, vocab) logits.
    """
    with loss_parallel():
        return lm_loss(logits, tokens)


def full_logits(logits: Tensor) -> Tensor:
    """Plain (B, T, vocab) logits on every rank from a DTensor (an all-gather: for sampling, not for the loss)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def pad_to_multiple(tokens: Tensor, multiple: int) -> Tensor:
    """Right-pad (B, T) tokens with zeros to a multiple of ``multiple`` positions (sequence parallel needs T % tp
    == 0). Causal attention makes the padding invisible to positions 0 .. T-1: read the logits there."""
    extra = -tokens.shape[1] % multiple
    return tokens if extra == 0 else torch.cat([tokens, tokens.new_zeros(tokens.shape[0], extra)], dim=1)
