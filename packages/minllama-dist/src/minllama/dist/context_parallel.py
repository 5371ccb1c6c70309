"""Context parallelism: one sequence split over N ranks, attention computed by passing keys and values round a ring.

Every layer of a transformer but one works token by token: norms, projections, the MLP, the loss. Split the
sequence over N ranks and those need no communication at all. Attention is the exception: each query needs the
keys and values of (causally: all earlier) tokens, which live on other ranks. Ring attention (Liu et al. 2023)
moves them instead of gathering them: the ranks form a ring, and at each of N steps every rank attends its own
queries to the key/value block it holds, then hands that block to the next rank:

    step 0: rank r attends q_r to (k, v)_r        and sends (k, v)_r       to rank r+1
    step 1: rank r attends q_r to (k, v)_(r-1)    and sends (k, v)_(r-1)   to rank r+1
    ...     after N steps every q_r has seen every block; no rank ever held more than two blocks at once

The N partial results of a query are merged exactly with the online-softmax rule: a block's softmax output and its
log-sum-exp ``lse = log Σ_j exp(s_j)`` are all one needs to combine it with another block's (``merge``). The
backward pass runs the same ring again and sends each block's gradients (dk, dv) along with it, so that after N
steps they arrive back at the rank that owns those keys.

Load balance: with a causal mask and contiguous chunks the last rank does 2N-1 times the work of the first. So
the sequence is cut into 2N chunks and rank r holds chunks r and 2N-1-r (``RingLayout.load_balanced``): every rank
then does the same work (README, section 4d, draws it).

Applied from outside: ``apply_context_parallel(model)`` swaps the class of every ``Attention`` for
``ContextParallelAttention``, whose ``attend`` step runs the ring while a layout is active (``cp.sequence``).
Nothing else in the model changes: RoPE gets each token's *global* position through the model's ``input_pos``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from minllama.core.model import Attention, MinimalLlama

from .training import train_step

BLOCK_ROWS = 512  # queries per tile inside a block: bounds the transient scores to (BLOCK_ROWS x block keys)


# ----------------------------------------------------------------------------------------------------------------
# Which rank holds which tokens


@dataclass(frozen=True)
class RingLayout:
    """Where the tokens of one sequence of ``seq_len`` live: ``positions[r]`` (L,) are the global positions of the
    L tokens rank r holds, increasing. Positions >= ``seq_len`` are padding (the sequence is padded up to N*L): their
    keys are hidden from every query, their outputs are ignored."""

    positions: Tensor  # (N, L) int64, on the CPU: the crop of each block is computed from it on the host
    seq_len: int

    def __post_init__(self):
        if self.positions.dim() != 2 or self.seq_len < 1:
            raise ValueError("a RingLayout needs positions (n_ranks, tokens per rank) and seq_len >= 1")
        if (self.positions.diff(dim=1) <= 0).any():
            raise ValueError("the positions of each rank must be increasing: ring attention crops every block to "
                             "the rows and columns the causal mask leaves visible, and needs them sorted")

    @classmethod
    def load_balanced(cls, seq_len: int, n_ranks: int) -> RingLayout:
        """2N chunks of ceil(seq_len / 2N) tokens; rank r holds chunk r and chunk 2N-1-r (equal causal work)."""
        if seq_len < 1 or n_ranks < 1:
            raise ValueError(f"need seq_len >= 1 and n_ranks >= 1, got {seq_len} and {n_ranks}")
        chunk = math.ceil(seq_len / (2 * n_ranks))  # the last chunks are padded when 2N does not divide seq_len
        chunks = torch.arange(2 * n_ranks * chunk).view(2 * n_ranks, chunk)  # (2N, chunk)
        return cls(torch.cat([chunks[:n_ranks], chunks.flip(0)[:n_ranks]], dim=1), seq_len)  # (N, 2*chunk)

    @classmethod
    def contiguous(cls, seq_len: int, n_ranks: int) -> RingLayout:
        """N contiguous chunks (rank r: tokens r*L .. (r+1)*L-1): correct too, but unbalanced when causal."""
        length = math.ceil(seq_len / n_ranks)
        return cls(torch.arange(n_ranks * length).view(n_ranks, length), seq_len)

    @property
    def n_ranks(self) -> int:
        return self.positions.shape[0]

    @property
    def local_len(self) -> int:
        return self.positions.shape[1]

    def shard(self, x: Tensor, rank: int, dim: int = 1, pad_value=0) -> Tensor:
        """Rank ``rank``'s tokens of ``x`` (its size along ``dim`` is seq_len), padding filled with ``pad_value``."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"the layout is for {self.seq_len} tokens, the tensor has {x.shape[dim]} along dim {dim}")
        pos = self.positions[rank].to(x.device)
        real = pos < self.seq_len
        out = x.index_select(dim, pos.clamp(max=self.seq_len - 1))
        if not real.all():
            shape = [1] * x.dim()
            shape[dim] = -1
            out = out.masked_fill(~real.view(shape), pad_value)
        return out

    def unshard(self, pieces: list[Tensor], dim: int = 1) -> Tensor:
        """The inverse of ``shard``: every rank's piece (in rank order) -> the whole sequence, padding dropped."""
        whole = torch.cat(pieces, dim=dim)
        order = self.positions.flatten().argsort().to(whole.device)  # where each global position sits in `whole`
        return whole.index_select(dim, order[:self.seq_len])

    def causal_work(self) -> list[int]:
        """(query, key) pairs each rank computes under a causal mask, padding excluded: the load balance."""
        p = self.positions
        real = p < self.seq_len
        return [int((real[r][:, None] & real.flatten()[None, :] & (p.flatten()[None, :] <= p[r][:, None])).sum())
                for r in range(self.n_ranks)]


# ----------------------------------------------------------------------------------------------------------------
# One block: this rank's queries against one rank's keys and values


def visible_crop(pq: Tensor, pk: Tensor, seq_len: int, causal: bool) -> tuple[int, int, bool]:
    """The rectangle of a (queries x keys) block that can be non-zero: query rows ``q_start:``, key columns
    ``:k_end``, and whether the causal mask cuts through it. pq, pk: (L,) increasing positions, on the CPU.

    Real keys come first (padding sits at the end), a causal query sees a prefix of keys, and the queries that see
    anything are a suffix: so the visible part is one rectangle. With the load-balanced layout it is exactly a
    half block off the diagonal, with no mask at all (this is where the balance comes from)."""
    k_end = int((pk < seq_len).sum())
    if not causal:
        return 0, k_end, False
    k_end = min(k_end, int(torch.searchsorted(pk, pq[-1], right=True)))  # keys some query may see
    q_start = int(torch.searchsorted(pq, pk[0]))  # queries that may see some key
    if k_end == 0 or q_start == len(pq):
        return len(pq), 0, False  # nothing visible: the block is skipped
    return q_start, k_end, bool(pk[k_end - 1] > pq[q_start])


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (softmax sums lose too much in half precision), fp64 for fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q: Tensor, k: Tensor, pq: Tensor, pk: Tensor, masked: bool, scale: float) -> Tensor:
    """q (B, G, R, l, D) x k (B, G, S, D) -> scaled scores (B, G, R, l, S), -inf where causally hidden.

    G kv heads, R = n_heads / n_kv_heads query heads per kv head: the R query heads of a group are just more query
    rows over the same keys (GQA without copying k or v)."""
    acc = _accumulation_dtype(q)
    s = torch.einsum("bgrld,bgsd->bgrls", q.to(acc), k.to(acc)) * scale
    if masked:
        s = s.masked_fill(pk[None, :] > pq[:, None], float("-inf"))  # (l, S) broadcast over B, G, R
    return s


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """The online-softmax merge of two partial attentions over disjoint key sets A and B:

        lse = log(exp(lse_A) + exp(lse_B))          out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B

    exact, since softmax over A∪B is each part's softmax reweighted by its share of the total mass. lse: (...,),
    out: (..., D); an lse of -inf (no key seen yet) contributes nothing."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = new_lse.masked_fill(new_lse == float("-inf"), 0.0)  # rows that saw nothing stay 0, not NaN
    out = out * (lse - safe).exp()[..., None] + block_out * (block_lse - safe).exp()[..., None]
    return out, new_lse


def _ring_group(group):
    if not dist.is_initialized():
        raise ValueError("ring attention runs over a process group: join one first (minllama.dist.init_distributed; "
                         "without torchrun it makes a group of one)")
    return dist.group.WORLD if group is None else group


def _ring_peers(group) -> tuple[int, int, int, int]:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prev = dist.get_global_rank(group, (rank - 1) % world)
    return rank, world, nxt, prev


def _start_shift(t: Tensor, group, nxt: int, prev: int, tag: int):
    """Send ``t`` to the next rank and receive the previous rank's into a new buffer; returns (buffer, works)."""
    buf = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag), dist.P2POp(dist.irecv, buf, prev, group, tag)]
    return buf, dist.batch_isend_irecv(ops)


def _finish(works) -> None:
    for w in works:
        w.wait()


class _RingAttention(torch.autograd.Function):
    """softmax(q kᵀ / √d) v over the whole ring. Forward keeps only q, k, v, the output and the lse (O(T/N) per
    rank); backward recomputes each block's probabilities from the saved lse (as FlashAttention does)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, causal, group, block_rows):
        # q (B, H, L, D), k, v (B, G, L, D), this rank's tokens
        B, H, L, D = q.shape
        G = k.shape[1]
        rank, world, nxt, prev = _ring_peers(group)
        scale = 1.0 / math.sqrt(D)
        q5 = q.view(B, G, H // G, L, D)  # (B, G, R, L, D): query heads grouped by the kv head they read
        pos = layout.positions
        pos_dev = pos.to(q.device)
        acc = _accumulation_dtype(q)
        out = q.new_zeros(q5.shape, dtype=acc)  # merged output so far (at least fp32 whatever the input dtype)
        lse = q.new_full(q5.shape[:-1], float("-inf"), dtype=acc)  # (B, G, R, L)
        kv = torch.stack([k, v])  # (2, B, G, L, D): one message per step
        for step in range(world):
            src = (rank - step) % world  # the rank whose keys and values we hold now
            if step < world - 1:
                kv_next, works = _start_shift(kv, group, nxt, prev, tag=0)  # travels while we compute
            q_start, k_end, masked = visible_crop(pos[rank], pos[src], layout.seq_len, causal)
            for a in range(q_start, L, block_rows):  # tiles of query rows: bounded transient memory
                b = min(a + block_rows, L)
                s = _scores(q5[..., a:b, :], kv[0, ..., :k_end, :], pos_dev[rank, a:b], pos_dev[src, :k_end],
                            masked, scale)  # (B, G, R, b-a, k_end)
                block_lse = torch.logsumexp(s, dim=-1)  # (B, G, R, b-a)
                p = s.sub_(block_lse.masked_fill(block_lse == float("-inf"), 0.0)[..., None]).exp_()  # in place
                block_out = torch.einsum("bgrls,bgsd->bgrld", p, kv[1, ..., :k_end, :].to(acc))
                out[..., a:b, :], lse[..., a:b] = merge(out[..., a:b, :], lse[..., a:b], block_out, block_lse)
            if step < world - 1:
                _finish(works)
                kv = kv_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.causal, ctx.group, ctx.block_rows = layout, causal, group, block_rows
        return out.view(B, H, L, D)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, causal, group, block_rows = ctx.layout, ctx.causal, ctx.group, ctx.block_rows
        B, H, L, D = q.shape
        G = k.shape[1]
        rank, world, nxt, prev = _ring_peers(group)
        scale = 1.0 / math.sqrt(D)
        q5 = q.view(B, G, H // G, L, D)
        acc = _accumulation_dtype(q)
        dout5 = dout.reshape(q5.shape).to(acc)  # (B, G, R, L, D)
        delta = (dout5 * out.to(acc)).sum(-1)  # (B, G, R, L): Σ_d dO·O, the softmax backward's row term
        pos = layout.positions
        pos_dev = pos.to(q.device)
        dq = torch.zeros(q5.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])  # (2, B, G, L, D)
        arriving = None  # (buffer, works): the gradients of the block we will hold next, sent by the previous rank
        for step in range(world):
            src = (rank - step) % world
            if step < world - 1:
                kv_next, works = _start_shift(kv, group, nxt, prev, tag=0)
            dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # this rank's share of the block's dk, dv
            q_start, k_end, masked = visible_crop(pos[rank], pos[src], layout.seq_len, causal)
            kb, vb = kv[0, ..., :k_end, :].to(acc), kv[1, ..., :k_end, :].to(acc)
            for a in range(q_start, L, block_rows):
                b = min(a + block_rows, L)
                s = _scores(q5[..., a:b, :], kb, pos_dev[rank, a:b], pos_dev[src, :k_end], masked, scale)
                p = s.sub_(lse[..., a:b, None]).exp_()  # the final softmax probabilities of this tile (B, G, R, l, S)
                dv = torch.einsum("bgrls,bgrld->bgsd", p, dout5[..., a:b, :])
                dp = torch.einsum("bgrld,bgsd->bgrls", dout5[..., a:b, :], vb)
                ds = dp.sub_(delta[..., a:b, None]).mul_(p).mul_(scale)  # d(loss)/d(q·k): softmax backward, 1/√d
                dq[..., a:b, :] += torch.einsum("bgrls,bgsd->bgrld", ds, kb)
                dkv[0, ..., :k_end, :] += torch.einsum("bgrls,bgrld->bgsd", ds, q5[..., a:b, :].to(acc))
                dkv[1, ..., :k_end, :] += dv
            if arriving is not None:  # the shares of the ranks that held this block before us (sent during compute)
                _finish(arriving[1])
                dkv += arriving[0]
            if world > 1:  # the block's gradients follow it round the ring: the next rank adds its share
                arriving = _start_shift(dkv, group, nxt, prev, tag=1)
            if step < world - 1:
                _finish(works)
                kv = kv_next
        if arriving is not None:  # one hop after the last step, our own block's gradients come home, complete
            _finish(arriving[1])
            dkv = arriving[0]
        return (dq.to(q.dtype).view(B, H, L, D), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, layout: RingLayout, causal: bool = True, group=None,
                   block_rows: int = BLOCK_ROWS) -> Tensor:
    """Attention of this rank's queries over the keys and values of every rank of ``group`` (default: all ranks).

    q (B, n_heads, L, head_dim), k, v (B, n_kv_heads, L, head_dim): this rank's L tokens, at the global positions
    ``layout.positions[rank]`` (already rotated by RoPE at those positions). Returns (B, n_heads, L, head_dim),
    exactly what full attention over the whole sequence gives for these tokens, with exact gradients."""
    group = _ring_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if layout.n_ranks != world:
        raise ValueError(f"the layout splits the sequence over {layout.n_ranks} ranks, the group has {world}: "
                         f"make it with RingLayout.load_balanced(seq_len, {world})")
    if q.shape[2] != layout.local_len or k.shape[2] != layout.local_len or v.shape != k.shape:
        raise ValueError(f"rank {rank} holds {layout.local_len} tokens in the layout; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}: shard the sequence with layout.shard")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not share {k.shape[1]} kv heads evenly (GQA needs a multiple)")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return _RingAttention.apply(q, k, v, layout, causal, group, block_rows)


# ----------------------------------------------------------------------------------------------------------------
# Applying it to a MinimalLlama


class ContextParallel:
    """The ring a model's attention runs on (a process group) and the layout of the sequence being processed.

    ``with cp.sequence(T) as layout:`` makes every ``ContextParallelAttention`` of the model run ring attention
    over ``layout``; outside it they are core's attention (generation, sampling: every rank the whole sequence).
    With activation checkpointing the backward pass runs the blocks' forward again, so it too must run inside
    (``cp_train_step`` does it); a ``sequence`` opened inside another one of the same length reuses its layout."""

    def __init__(self, group=None):
        self.group = _ring_group(group)
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.layout: RingLayout | None = None

    @contextlib.contextmanager
    def sequence(self, seq_len: int):
        if self.layout is not None:  # nested (the loss inside a training step): the outer one stays in charge
            if self.layout.seq_len != seq_len:
                raise ValueError(f"a sequence of {self.layout.seq_len} tokens is active on this ring: finish it "
                                 f"before starting one of {seq_len}")
            yield self.layout
            return
        self.layout = RingLayout.load_balanced(seq_len, self.world)
        try:
            yield self.layout
        finally:
            self.layout = None

    def shard_tokens(self, tokens: Tensor, tp: int = 1) -> tuple[Tensor, Tensor]:
        """This rank's inputs and next-token targets, (b, L) each, of the rows ``tokens`` (b, T+1), inside
        ``sequence(T)``; the targets of padding positions are -100 (the loss ignores them). Refuses, before any
        collective, an L that sequence parallel (tensor parallel inside the ring) cannot split over ``tp``."""
        layout, T = self.layout, tokens.shape[1] - 1
        if layout is None or layout.seq_len != T:
            raise ValueError(f"rows of {T} inputs + 1 target are split inside cp.sequence({T}), not outside it")
        if layout.local_len % tp:
            raise ValueError(f"{T} tokens over a ring of {self.world} give {layout.local_len} per rank, which "
                             f"sequence parallel cannot split over tp={tp}: use a --seq-len that is a multiple of "
                             f"2 * cp * tp = {2 * self.world * tp}")
        return layout.shard(tokens[:, :-1], self.rank), layout.shard(tokens[:, 1:], self.rank, pad_value=-100)

    def rope_positions(self, layout: RingLayout, max_seq_len: int, device=None) -> Tensor:
        """This rank's ``input_pos`` (L,): the tokens' global positions (padding clamped into the RoPE table)."""
        return layout.positions[self.rank].clamp(max=max_seq_len - 1).to(device)


RING_ONLY = ("ring attention runs plain causal passes only: no padding (pad), KV cache or input longer than the "
             "layout inside cp.sequence; generate outside it")


class ContextParallelAttention(Attention):
    """core's ``Attention`` whose ``attend`` step is ring attention while a layout is active."""

    context_parallel: ContextParallel

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None = None, cache=None, slots=None) -> Tensor:
        if cache is not None and self.context_parallel.layout is not None:  # (a first prompt into a cache is a plain
            raise ValueError(RING_ONLY)  # causal pass, but the cache would keep only this rank's chunk of it)
        return super().forward(x, rope, mask, cache, slots)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        layout = self.context_parallel.layout
        if layout is None:
            return super().attend(q, k, v, mask)  # no active sequence: the whole sequence is here
        if mask is not None or k.shape[2] != q.shape[2]:
            raise ValueError(RING_ONLY)
        return ring_attention(q, k, v, layout, causal=True, group=self.context_parallel.group)


def apply_context_parallel(model: MinimalLlama, group=None) -> ContextParallel:
    """Make every attention of ``model`` ring-capable over ``group`` (in place). Weights and state dict unchanged."""
    for layer in model.layers:  # check them all first: an error leaves the model as it was
        if not isinstance(layer.attention, Attention):
            raise TypeError(f"layer attention is a {type(layer.attention).__name__}, not core's Attention: apply "
                            "context parallelism to a model whose attention modules are core's")
    cp = ContextParallel(group)
    for layer in model.layers:
        layer.attention.__class__ = ContextParallelAttention
        layer.attention.context_parallel = cp
    return cp


def context_parallel_loss(model: MinimalLlama, cp: ContextParallel, tokens: Tensor) -> Tensor:
    """This rank's share of the next-token loss of ``tokens`` (b, T+1), every rank of the ring given the same rows.

    The rank sums the cross-entropy of its own tokens and divides by (b*T / N): the *mean* over the N ranks of
    these shares is the loss of the rows, so averaging gradients over the ring ranks (as data parallelism or FSDP
    does) gives exactly the gradient of one process on the whole sequences."""
    T = tokens.shape[1] - 1
    tp = getattr(model, "tp_size", 1)  # tensor parallel too: sequence parallel splits each rank's L tokens again
    with cp.sequence(T) as layout:
        local_inputs, local_targets = cp.shard_tokens(tokens, tp)  # (b, L) each
        input_pos = cp.rope_positions(layout, model.config.max_seq_len, tokens.device)
        logits = model(local_inputs, input_pos=input_pos)  # (b, L, vocab)
    # (under tensor parallel the logits are vocabulary-sharded, (b, L, vocab/tp): the caller runs this and the
    # backward inside loss_parallel, as cp_train_step does)
    return loss_share(logits, local_targets, cp.world, T)


def loss_share(logits: Tensor, local_targets: Tensor, n_ranks: int, seq_len: int) -> Tensor:
    """One ring rank's share of the mean next-token loss of b rows of ``seq_len`` tokens: the cross-entropy
    *summed* over the rank's own tokens (targets of -100, the padding, ignored), divided by b * seq_len / n_ranks.
    Dividing by the whole row's token count, not the rank's, is what makes the mean of the n_ranks shares the loss
    of the rows. logits (b, L, vocab), local_targets (b, L). Also the last pipeline stage's loss under PP x CP."""
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), local_targets.flatten(), ignore_index=-100,
                               reduction="sum")
    return loss_sum * n_ranks / (logits.shape[0] * seq_len)


def average_gradients(model: torch.nn.Module, group) -> None:
    """Average plain (unsharded) gradients over ``group``: what DDP does; FSDP does it itself."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= world


def cp_train_step(model, optimizer, tokens: Tensor, cp: ContextParallel, max_grad_norm: float | None = 1.0) -> float:
    """``training.train_step`` with the sequence split over the ring; returns the loss averaged over all ranks.
    A model that is tensor parallel too (``parallelize_llama`` on a mesh with cp and tp) computes its
    vocabulary-sharded loss, and its backward, inside ``loss_parallel``."""
    vocab_sharded = getattr(model, "tp_size", 1) > 1
    with cp.sequence(tokens.shape[1] - 1), loss_parallel() if vocab_sharded else contextlib.nullcontext():
        loss = context_parallel_loss(model, cp, tokens)  # (the sequence stays active during backward:
        loss.backward()  # activation checkpointing recomputes the forward there)
    sharded = any(hasattr(p, "placements") for p in model.parameters())  # DTensors: FSDP averages the gradients
    if not sharded:
        average_gradients(model, cp.group)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss.detach()
    if isinstance(loss, DTensor):  # replicated over the tp ranks
        loss = loss.to_local()
    if dist.get_world_size() > 1:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return float(loss)


@torch.no_grad()
def cp_prefill(model: MinimalLlama, cp: ContextParallel, tokens: Tensor) -> Tensor:
    """The logits of the last token of ``tokens`` (B, T) -> (B, 1, vocab), the prompt split over the ring (every
    rank gets the result). No KV cache: enough to score a long prompt or pick the first generated token."""
    B, T = tokens.shape
    with cp.sequence(T) as layout:
        input_pos = cp.rope_positions(layout, model.config.max_seq_len, tokens.device)
        h = model.hidden_states(layout.shard(tokens, cp.rank), input_pos=input_pos)  # (B, L, dim)
    owner, index = divmod(int((layout.positions.flatten() == T - 1).nonzero()), layout.local_len)
    logits = model.output(h[:, index:index + 1]) if cp.rank == owner else None
    if logits is None:
        logits = torch.empty(B, 1, model.config.vocab_size, device=tokens.device, dtype=h.dtype)
    dist.broadcast(logits, dist.get_global_rank(cp.group, owner), group=cp.group)
    return logits


def context_parallel_groups(cp_size: int) -> tuple[object, int, int]:
    """Split all ranks into rings of ``cp_size`` consecutive ranks: returns (this rank's ring group, its data-
    parallel index, the number of rings). The ranks of one ring read the same batch rows, each its part of the
    sequence; the rings read different rows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"rings of {cp_size} ranks do not split the {world} ranks")
    mine = None
    for ring in range(world // cp_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(ring * cp_size, (ring + 1) * cp_size)))
        if ring == rank // cp_size:
            mine = group
    return mine, rank // cp_size, world // cp_size


def context_parallel_training(model: MinimalLlama, cp_size: int, global_batch: int):
    """What ``apps/train.py --cp N`` needs: (the step function, this rank's data index, the number of data groups).

    With N = 1 it is plain ``train_step`` and every rank its own data index. Otherwise the ranks form rings of N,
    every attention of ``model`` runs on its ring, and the batch is split over the rings, not the ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"--cp {cp_size} does not divide the {world} rank{'s' * (world != 1)} into rings: use --cp "
                         f"{' or '.join(str(d) for d in range(1, world + 1) if world % d == 0)}")
    data_world = world // cp_size
    if global_batch % data_world:
        what = f"{world} ranks" if cp_size == 1 else f"{data_world} rings of --cp {cp_size} ranks"
        raise ValueError(f"--batch-size {global_batch} must be a multiple of the {what}")
    if cp_size == 1:
        return train_step, rank, world
    group, data_rank, _ = context_parallel_groups(cp_size)
    cp = apply_context_parallel(model, group)
    return (lambda m, opt, tokens: cp_train_step(m, opt, tokens, cp)), data_rank, data_world
