"""Tensor parallelism for generation: every rank holds a slice of every block's weights and computes a slice of
every head, so a model too big (or too slow) for one device is served by several, token for token identical.

A transformer block is two matrix products in a row, twice (attention, then the MLP); Megatron's observation is
that splitting the first by *columns* and the second by *rows* needs one all-reduce per pair, and nothing between:

    x (replicated) --wq,wk,wv: column split--> each rank: its own heads (n_heads/N of q, n_kv_heads/N of k,v)
                   --attention, per head: no communication--
                   --wo: row split (its input columns = its heads)--> partial sums --all-reduce--> y (replicated)

    x (replicated) --w1, w3: column split--> each rank: hidden_dim/N features --silu(w1 x) * w3 x: elementwise--
                   --w2: row split--> partial sums --all-reduce--> y (replicated)

Each rank also keeps only its kv heads in the KV cache: cache memory is split N ways too. Embedding, norms and
output head stay replicated (small next to the blocks for large models, and they keep the sampling identical).
"""
from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from minllama.core import MinimalLlama

BLOCK_PLAN = {
    "attention.wq": ColwiseParallel(),  # output features (= heads) split across ranks
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),  # input features (= heads) split; output all-reduced
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


def apply_tensor_parallel(model: MinimalLlama, mesh: DeviceMesh) -> MinimalLlama:
    """Split every block of ``model`` over the ranks of ``mesh`` (in place) and return it.

    Each rank's ``Attention`` then sees plain local tensors with n_heads/N query heads and n_kv_heads/N kv heads:
    its ``n_heads``/``n_kv_heads`` attributes (which size its ``view``s) are set to those local counts here.
    Query head h uses kv head h // n_rep; contiguous slices keep each query head with its kv head on one rank.
    """
    cfg, n = model.config, mesh.size()
    for what, count in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("hidden_dim", cfg.hidden_dim)):
        if count % n:
            raise ValueError(f"{what}={count} does not split over {n} ranks: tensor parallelism needs a multiple "
                             f"(use {', '.join(str(k) for k in range(1, count + 1) if count % k == 0)} ranks)")
    for block in model.layers:
        parallelize_module(block, mesh, BLOCK_PLAN)
        block.attention.n_heads = cfg.n_heads // n
        block.attention.n_kv_heads = cfg.n_kv_heads // n
    model.tp_size = n
    return model


