"""A paged KV cache: one pool of fixed-size blocks shared by every sequence, as an operating system pages memory.

A static cache reserves ``max_len`` slots per row up front: a batch of requests of different lengths wastes most of
it, and a new request cannot join until the whole batch is done. Paging fixes both. Each layer's keys and values
live in one pool of ``n_blocks`` blocks of ``block_size`` slots; a sequence owns a list of blocks, its *block table*,
and gets a new block only when its last one is full. Position p of a sequence is stored in

    block = table[p // block_size],  slot = block * block_size + p % block_size

    pool:   [ blk0 | blk1 | blk2 | blk3 | blk4 | blk5 | ... ]      sequence A: table [2, 0]    (positions 0..31)
                                                                 sequence B: table [1, 4, 5] (positions 0..47)

Attention gathers a sequence's keys through its table, in position order, so that the model sees what a static
cache would give it: ``PagedKVCache`` implements the cache interface of ``cache.py`` and the model code does not
change. Blocks return to the pool when a sequence ends. ``BlockPool`` keeps the free list and reference counts,
so that full blocks holding the same prefix (a shared system prompt, the earlier turns of a chat) can be shared by
several sequences: see ``engine.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cache import KVCache, storage_dtype


class PoolFull(RuntimeError):
    """No free block is left: the caller waits for a sequence to end, or preempts one."""


class BlockPool:
    """The free list and reference counts of ``n_blocks`` blocks; a block with count 0 is free (or cached)."""

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.refs = [0] * n_blocks
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: the most recently freed block is reused first

    def allocate(self) -> int:
        if not self.free:
            raise PoolFull(f"all {self.n_blocks} KV blocks are in use")
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int, keep: bool = False) -> None:
        """Drop one reference. A block with none left goes back on the free list, unless ``keep`` (its contents
        stay valid for a prefix cache, which gives it back later)."""
        self.refs[block] -= 1
        if self.refs[block] == 0 and not keep:
            self.free.append(block)

    def n_free(self) -> int:
        return len(self.free)


class PagedKVCache(KVCache):
    """Keys and values of many sequences of different lengths in one pool of blocks per layer.

    k[layer], v[layer]: (n_kv_heads, n_blocks * block_size, head_dim), keys stored rotated. Before each forward,
    ``prepare(seq_ids, n_new)`` says which sequences the rows of the batch are and how many new tokens each brings;
    it allocates the blocks they need and returns their positions (B, n_new), the ``input_pos`` of that forward.
    """

    def __init__(self, model, n_blocks: int, block_size: int = 16, dtype=None):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"need n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        ref = model.norm.weight
        self.block_size, self.max_len = block_size, model.config.max_seq_len
        self.pool = BlockPool(n_blocks)
        self.k, self.v = [], []
        for i, layer in enumerate(model.layers):
            assert layer.attention.layer_index == i, "layers must know their index (core's TransformerBlock)"
            n_kv_heads, head_dim = layer.attention.cache_shape()
            self.k.append(torch.zeros(n_kv_heads, n_blocks * block_size, head_dim,
                                      dtype=storage_dtype(model, dtype), device=ref.device))
            self.v.append(torch.zeros_like(self.k[-1]))
        self.tables: dict[int, list[int]] = {}  # sequence id -> its blocks, in position order
        self.lengths: dict[int, int] = {}  # sequence id -> tokens stored
        self._step: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def for_memory(cls, model, nbytes: int, block_size: int = 16, dtype=None) -> PagedKVCache:
        """As many blocks as fit in ``nbytes`` of keys and values (all layers)."""
        per_token = sum(2 * h * d for h, d in (layer.attention.cache_shape() for layer in model.layers))
        per_block = per_token * block_size * storage_dtype(model, dtype).itemsize
        if nbytes < per_block:
            raise ValueError(f"{nbytes} bytes hold no block of {block_size} tokens ({per_block} bytes): give more")
        return cls(model, nbytes // per_block, block_size, dtype)

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ------------------------------------------------------------------ sequences
    def add(self, seq_id: int, shared_blocks: list[int] = ()) -> None:
        """Start a sequence, optionally on full blocks that already hold its first tokens (a shared prefix)."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        self.tables[seq_id], self.lengths[seq_id] = [], 0
        for block in shared_blocks:
            self.share(seq_id, block)

    def share(self, seq_id: int, block: int) -> None:
        """Append a full block that already holds this sequence's next ``block_size`` tokens (a cached prefix)."""
        if self.lengths[seq_id] != len(self.tables[seq_id]) * self.block_size:
            raise ValueError(f"sequence {seq_id} ends inside a block: only a sequence at a block boundary can "
                             "take a shared block")
        self.pool.share(block)
        self.tables[seq_id].append(block)
        self.lengths[seq_id] += self.block_size

    def remove(self, seq_id: int, keep=lambda block: False) -> None:
        """End a sequence: its blocks return to the pool (a shared block stays with its other users; a block for
        which ``keep(block)`` is true stays out of the free list, for a prefix cache)."""
        for block in self.tables.pop(seq_id):
            self.pool.release(block, keep(block))
        del self.lengths[seq_id]

    def grow(self, seq_id: int, n_new: int) -> None:
        """Make room for ``n_new`` more tokens of a sequence; ``PoolFull`` if there are not enough free blocks."""
        table, n = self.tables[seq_id], self.lengths[seq_id] + n_new
        if n > self.max_len:
            raise ValueError(f"sequence {seq_id} would hold {n} tokens, more than the model's context of "
                             f"{self.max_len}")
        missing = self.blocks_needed(n) - len(table)
        if missing > self.pool.n_free():
            raise PoolFull(f"sequence {seq_id} needs {missing} more KV blocks, {self.pool.n_free()} are free")
        table += [self.pool.allocate() for _ in range(missing)]

    # ------------------------------------------------------------------ one forward
    def prepare(self, seq_ids: list[int], n_new: int, device=None) -> Tensor:
        """The rows of the next forward are ``seq_ids``, each with ``n_new`` new tokens: allocate their blocks and
        plan where everything goes. Returns the new tokens' positions (B, n_new), the forward's ``input_pos``."""
        for s in seq_ids:
            self.grow(s, n_new)
        device = device or self.k[0].device
        starts = torch.tensor([self.lengths[s] for s in seq_ids], device=device)  # (B,)
        positions = starts[:, None] + torch.arange(n_new, device=device)  # (B, T)
        width = max(self.lengths[s] + n_new for s in seq_ids)  # keys to gather per row: the longest row's
        width_blocks = self.blocks_needed(width)
        tables = torch.tensor([t[:width_blocks] + [0] * (width_blocks - len(t[:width_blocks]))
                               for t in (self.tables[s] for s in seq_ids)], device=device)  # (B, blocks)
        offsets = torch.arange(self.block_size, device=device)
        key_slots = (tables[:, :, None] * self.block_size + offsets).flatten(1)  # (B, S): position -> pool slot
        slots = key_slots.gather(1, positions)  # (B, T): where the new keys go
        # query at position p sees positions 0..p of its own row (beyond a row's length: padding of the gather)
        mask = torch.arange(key_slots.shape[1], device=device)[None, None, :] <= positions[:, :, None]  # (B, T, S)
        self._step = (positions, slots, mask[:, None], key_slots)
        for s in seq_ids:
            self.lengths[s] += n_new
        return positions

    def plan(self, input_pos: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self._step is None or pad is not None:
            raise ValueError("a paged cache plans its own batches: call cache.prepare(seq_ids, n_new) before each "
                             "forward and pass what it returns as input_pos (no padding)")
        positions, slots, mask, _ = self._step
        return positions, slots, mask

    def update(self, attn, q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
               slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, n_heads, head_dim), k, v (B, T, n_kv_heads, head_dim) -> q and every key/value of each row,
        gathered through its block table in position order: (B, heads, S, head_dim)."""
        q, k = attn.rotate(q, k, rope)
        pool_k, pool_v = self.k[attn.layer_index], self.v[attn.layer_index]  # (n_kv_heads, n_slots, head_dim)
        flat = slots.flatten()  # (B*T,)
        pool_k.index_copy_(1, flat, k.flatten(0, 1).transpose(0, 1).to(pool_k.dtype))
        pool_v.index_copy_(1, flat, v.flatten(0, 1).transpose(0, 1).to(pool_v.dtype))
        key_slots = self._step[3]  # (B, S)
        B, S = key_slots.shape
        keys = pool_k[:, key_slots.flatten()].view(-1, B, S, pool_k.shape[-1]).transpose(0, 1)  # (B, kv, S, hd)
        values = pool_v[:, key_slots.flatten()].view(-1, B, S, pool_v.shape[-1]).transpose(0, 1)
        return q.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype)  # (a no-op unless stored narrower)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
