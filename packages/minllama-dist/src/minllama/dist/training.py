"""The pieces of a data-parallel training step that every rank runs identically.

Data parallelism splits each *global* batch across the ranks: rank r gets rows r*b .. (r+1)*b-1 of it (b = global
batch / world size). Each rank averages the loss over its rows; FSDP averages the gradients over ranks
(reduce-scatter, then / N). With equal row counts the mean of the per-rank means is the mean over the whole batch,
so N ranks compute exactly the gradient of one process on the global batch: the tests check that.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy: position t predicts token t+1. logits (B, T, vocab), tokens (B, T+1)."""
    targets = tokens[:, 1:]  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@dataclass
class TokenBatches:
    """Deterministic batches of windows from one long token stream, addressed by a *position* (batches consumed).

    Batch ``k`` is a pure function of (seed, k): resuming at ``position`` replays exactly the batches an unbroken
    run would have seen, without storing the data order. Each epoch is a fresh permutation of window starts.
    """

    tokens: Tensor  # (N,) int64
    seq_len: int  # tokens per window fed to the model (each row holds seq_len + 1 for the shifted targets)
    global_batch: int
    seed: int = 0
    position: int = 0

    def __post_init__(self):
        self.n_windows = (self.tokens.numel() - 1) // self.seq_len
        if self.n_windows < self.global_batch:
            raise ValueError(f"the corpus has {self.tokens.numel()} tokens: not enough for one batch of "
                             f"{self.global_batch} x {self.seq_len + 1}; use a shorter --seq-len or --batch-size")

    def batch(self, k: int) -> Tensor:
        """The k-th global batch, (global_batch, seq_len + 1)."""
        per_epoch = self.n_windows // self.global_batch
        epoch, i = divmod(k, per_epoch)
        order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
        starts = order[i * self.global_batch:(i + 1) * self.global_batch] * self.seq_len
        return torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])

    def next_for_rank(self, rank: int = 0, world: int = 1) -> Tensor:
        """This rank's rows of the next global batch, (global_batch / world, seq_len + 1); advances position."""
        if self.global_batch % world:
            raise ValueError(f"global batch {self.global_batch} does not split over {world} ranks")
        rows = self.global_batch // world
        out = self.batch(self.position)[rank * rows:(rank + 1) * rows]
        self.position += 1
        return out


def train_step(model, optimizer, tokens: Tensor, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step on this rank's rows; returns the loss averaged over *all* ranks (the global loss).

    Tensor-parallel ranks of one data-parallel group hold the same rows and the same loss, so the average over all
    ranks is still the average over the data-parallel groups."""
    logits = model(tokens[:, :-1])  # (b, T, vocab); under tensor parallel a DTensor, sharded over the vocabulary
    # vocabulary-sharded logits: the loss and its backward run in loss_parallel (parallelize.py says why)
    with loss_parallel() if isinstance(logits, DTensor) else nullcontext():
        loss = lm_loss(logits, tokens)
        loss.backward()
    if max_grad_norm is not None:  # on DTensor gradients this computes the *global* norm (a collective)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach()
    if isinstance(loss, DTensor):  # replicated over the tensor-parallel ranks: every rank holds the value
        loss = loss.to_local()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss)  # sum (gloo has no average), then divide
        loss /= dist.get_world_size()
    return float(loss)
