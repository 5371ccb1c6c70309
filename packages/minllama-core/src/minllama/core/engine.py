"""An inference engine: continuous batching over a paged KV cache, with prefix caching.

``generate`` runs one fixed batch: every row waits for the longest one, and a new request waits for the whole batch.
The engine instead keeps a set of *running* sequences and, at every step,

    1. admits waiting requests while the batch and the KV pool have room (their shared prefix blocks are reused),
    2. feeds one chunk of one admitted prompt (chunked prefill: a long prompt never stalls the running decodes),
    3. runs ONE batched decode step over every running sequence, whatever their lengths (the paged cache gives each
       row its own keys), samples each row with its own settings, and retires the rows that are done.

A request that finishes frees its blocks at once, and the next waiting request takes its place in the batch.

Prefix caching: a full block is named by the hash of every token up to its end, so two sequences whose first
k · block_size tokens agree name the same k blocks. Finished sequences leave their full blocks in the cache
(unreferenced, reused when the pool runs short); a new request walks its prompt block by block and shares every
block already there, so a shared system prompt or the earlier turns of a chat are computed once. Shared blocks are
full and never written again: a sequence writes only into blocks of its own (no copy is ever needed).

When the pool is full, the most recently admitted running sequence is *preempted*: its blocks are released and it
waits again with its prompt and the tokens it has produced so far, which are recomputed when it returns (the
output is unchanged: it is the same computation).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .generate import NAN_LOGITS, check_generation_args, sample
from .paged_cache import PagedKVCache, PoolFull


@dataclass
class Request:
    """One generation: a prompt, its own sampling settings and budget; the engine fills ``output``."""

    prompt: Sequence[int]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: Iterable[int] = ()
    id: int = -1
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop id), "length" (the budget or the context), "cancelled"
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache (not recomputed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Sequence:
    request: Request
    tokens: list[int]  # everything this sequence must hold: prompt, then the generated tokens
    fed: int = 0  # how many of ``tokens`` are in the cache
    generator: torch.Generator | None = None
    hashes: list[int] = field(default_factory=list)  # prefix hashes of its full blocks, computed once each
    stop: frozenset[int] = frozenset()  # the request's stop ids, as a set once

    @property
    def prefilling(self) -> bool:  # the last token is fed by a decode step
        return self.fed < len(self.tokens) - 1


class Engine:
    """Serve many requests at once on one model. ``submit`` requests, then call ``step`` (or ``run``) until idle.

    ``n_blocks`` x ``block_size`` slots of KV cache (or ``kv_bytes``), at most ``max_batch`` running sequences,
    prompts fed ``prefill_chunk`` tokens at a time."""

    def __init__(self, model, n_blocks: int | None = None, block_size: int = 16, max_batch: int = 16,
                 prefill_chunk: int = 256, kv_bytes: int | None = None, prefix_caching: bool = True):
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        if kv_bytes is not None:
            self.cache = PagedKVCache.for_memory(model, kv_bytes, block_size)
        else:
            n_blocks = n_blocks or max_batch * -(-model.config.max_seq_len // block_size)
            self.cache = PagedKVCache(model, n_blocks, block_size)
        self.device = model.norm.weight.device
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.prefix_caching = prefix_caching
        self.cached: OrderedDict[int, int] = OrderedDict()  # prefix hash -> block (least recently used first)
        self.block_hash: dict[int, int] = {}  # block -> its prefix hash
        self._ids = itertools.count()
        self.stats = {"prefilled": 0, "from_cache": 0, "decode_steps": 0, "preempted": 0}

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> Request:
        cfg = self.model.config
        check_generation_args([request.prompt], request.max_new_tokens, cfg.vocab_size,
                              temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        if len(request.prompt) >= cfg.max_seq_len:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens but the model's context is "
                             f"{cfg.max_seq_len}: shorten it to leave room for an answer")
        if self.cache.blocks_needed(len(request.prompt) + 1) > self.cache.pool.n_blocks:
            raise ValueError(f"the prompt needs more KV blocks than the whole pool ({self.cache.pool.n_blocks}): "
                             "give the engine more KV memory")
        request.id = next(self._ids)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self.waiting.append(_Sequence(request, list(request.prompt), generator=generator,
                                      stop=frozenset(request.stop_ids)))
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now (a client went away): its blocks return to the pool at once."""
        for seq in list(self.running):
            if seq.request is request:
                self._retire(seq, "cancelled")
        for seq in list(self.waiting):
            if seq.request is request:
                self.waiting.remove(seq)
                request.finish_reason = "cancelled"

    def blocks_in_use(self) -> int:
        """Blocks some sequence holds (0 once the engine drains: none leaked). Cached prefix blocks nobody holds
        count as free: they are given back as soon as the pool needs them."""
        return sum(1 for r in self.cache.pool.refs if r > 0)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> None:
        while not self.idle:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **settings) -> list[list[int]]:
        """All prompts through the engine at once; each row's tokens (stop id included), as ``generate`` gives."""
        requests = [self.submit(Request(p, max_new_tokens, **settings)) for p in prompts]
        self.run()
        return [r.output for r in requests]

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Admit, feed one prefill chunk, decode every running sequence once. Returns the (request, token) pairs
        produced in this step, in order."""
        self._admit()
        produced = []
        prefilling = next((s for s in self.running if s.prefilling), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling)
        ready = [s for s in self.running if not s.prefilling]
        if ready:
            produced = self._decode(ready)
        return produced

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            shared, hashes = self._cached_prefix(seq.tokens)
            fresh = self.cache.blocks_needed(len(seq.tokens)) - len(shared)
            if fresh > self.cache.pool.n_free() + self._evictable(shared) and self.running:
                return  # no room now: wait for a running sequence to finish
            self.waiting.popleft()
            self.cache.add(seq.request.id, shared)
            seq.fed, seq.hashes = len(shared) * self.cache.block_size, hashes
            seq.request.cached_tokens = max(seq.request.cached_tokens, seq.fed)
            self.stats["from_cache"] += seq.fed
            for block in shared:  # in use again: no longer evictable
                self.cached.move_to_end(self.block_hash[block])
            self.running.append(seq)

    def _prefill_chunk(self, seq: _Sequence) -> None:
        self._share_new_cached_blocks(seq)
        if not seq.prefilling:  # the cache held all of its prompt
            return
        end = min(seq.fed + self.prefill_chunk, len(seq.tokens) - 1)  # the last token goes through decode
        chunk = torch.tensor([seq.tokens[seq.fed:end]], device=self.device)
        if not self._grow([seq], chunk.shape[1]):
            return
        positions = self.cache.prepare([seq.request.id], chunk.shape[1], self.device)
        self.model.hidden_states(chunk, positions, cache=self.cache)  # keys and values only: no logits needed
        self.stats["prefilled"] += chunk.shape[1]
        seq.fed = end
        self._remember_blocks(seq)

    def _decode(self, batch: list[_Sequence]) -> list[tuple[Request, int]]:
        if not self._grow(batch, 1):
            batch = [s for s in batch if s in self.running]
            if not batch:
                return []
        tokens = torch.tensor([[s.tokens[s.fed]] for s in batch], device=self.device)  # (B, 1)
        positions = self.cache.prepare([s.request.id for s in batch], 1, self.device)
        logits = self.model(tokens, positions, cache=self.cache)[:, -1]  # (B, vocab)
        if bool(logits.amax().isnan()):
            raise ValueError(NAN_LOGITS)
        self.stats["decode_steps"] += 1
        produced = []
        for row, seq in enumerate(batch):
            r = seq.request
            seq.fed += 1  # a preempted sequence has recomputed its earlier tokens in prefill: this one is new
            self._remember_blocks(seq)
            token = int(sample(logits[row:row + 1], r.temperature, r.top_k, r.top_p, seq.generator)[0])
            r.output.append(token)
            seq.tokens.append(token)
            produced.append((r, token))
            if token in seq.stop:
                self._retire(seq, "stop")
            elif len(r.output) >= r.max_new_tokens or len(seq.tokens) >= self.model.config.max_seq_len:
                self._retire(seq, "length")
        return produced

    # ------------------------------------------------------------------ blocks
    def _grow(self, batch: list[_Sequence], n_new: int) -> bool:
        """Find blocks for ``n_new`` more tokens of each sequence of ``batch``: evict unused cached blocks, then
        preempt the most recently admitted sequences, until it fits. False if ``batch`` lost members."""
        def blocks_missing(batch):
            return sum(self.cache.blocks_needed(self.cache.lengths[s.request.id] + n_new)
                       - len(self.cache.tables[s.request.id]) for s in batch)

        need, complete = blocks_missing(batch), True
        while need > self.cache.pool.n_free():
            if self._evict_one():
                continue
            victim = self.running[-1]
            if victim in batch:
                complete = False
                batch = [s for s in batch if s is not victim]
                need = blocks_missing(batch)
            self._preempt(victim)
            if not self.running:
                raise PoolFull("one sequence does not fit in the KV pool: give the engine more KV memory")
        return complete

    def _preempt(self, seq: _Sequence) -> None:
        self.running.remove(seq)
        self._release(seq.request.id)
        seq.fed, seq.hashes = 0, []
        self.waiting.appendleft(seq)  # first in line when room comes back; its tokens so far are recomputed
        self.stats["preempted"] += 1

    def _retire(self, seq: _Sequence, reason: str) -> None:
        seq.request.finish_reason = reason
        self.running.remove(seq)
        self._release(seq.request.id)

    def _release(self, seq_id: int) -> None:
        # a block that holds a cached prefix is kept (unreferenced) until the pool needs it: ``_evict_one``
        self.cache.remove(seq_id, keep=lambda block: block in self.block_hash)

    def _evictable(self, keep: list[int]) -> int:
        return sum(1 for b in self.cached.values() if self.cache.pool.refs[b] == 0 and b not in keep)

    def _evict_one(self) -> bool:
        """Give the least recently used unreferenced cached block back to the free list."""
        for h, block in self.cached.items():
            if self.cache.pool.refs[block] == 0:
                del self.cached[h], self.block_hash[block]
                self.cache.pool.free.append(block)
                return True
        return False

    # ------------------------------------------------------------------ prefix cache
    def _block_hash(self, previous: int, tokens: Sequence[int], i: int) -> int:
        """The name of block i of ``tokens``: the hash of the previous block's name and this block's tokens, so it
        names the whole prefix up to the block's end, not just the block."""
        bs = self.cache.block_size
        return hash((previous, tuple(tokens[i * bs:(i + 1) * bs])))

    def _prefix_hashes(self, tokens: Sequence[int], n_blocks: int) -> Iterator[int]:
        h = 0
        for i in range(n_blocks):
            h = self._block_hash(h, tokens, i)
            yield h

    def _cached_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """The cached blocks that hold the first tokens of ``tokens`` (at most all but the last token, whose
        logits must be computed), and their prefix hashes."""
        blocks, hashes = [], []
        if not self.prefix_caching:
            return blocks, hashes
        for h in self._prefix_hashes(tokens, (len(tokens) - 1) // self.cache.block_size):
            if h not in self.cached:
                break
            blocks.append(self.cached[h])
            hashes.append(h)
        return blocks, hashes

    def _share_new_cached_blocks(self, seq: _Sequence) -> None:
        """Blocks that another sequence cached *after* this one was admitted: share them instead of computing them.

        Requests that arrive together (a burst of clients with the same system prompt) all find the cache empty
        when admitted; the first to be prefilled fills it, and the others take its blocks here, one prefill chunk
        later, rather than each computing the shared prompt again."""
        if not self.prefix_caching:
            return
        table, bs = self.cache.tables[seq.request.id], self.cache.block_size
        while seq.fed == len(table) * bs and (len(table) + 1) * bs <= len(seq.tokens) - 1:
            i = len(table)  # the next block to fill is a full block of the prompt: is it cached?
            h = self._block_hash(seq.hashes[-1] if seq.hashes else 0, seq.tokens, i)
            block = self.cached.get(h)
            if block is None:
                return
            self.cache.share(seq.request.id, block)
            self.cached.move_to_end(h)
            seq.hashes.append(h)
            seq.fed += bs
            seq.request.cached_tokens = max(seq.request.cached_tokens, seq.fed)
            self.stats["from_cache"] += bs

    def _remember_blocks(self, seq: _Sequence) -> None:
        """Name the sequence's full blocks by their prefix hash, so later requests can share them."""
        if not self.prefix_caching:
            return
        table, bs = self.cache.tables[seq.request.id], self.cache.block_size
        while len(seq.hashes) < seq.fed // bs:  # a block just filled up
            i = len(seq.hashes)
            h = self._block_hash(seq.hashes[-1] if seq.hashes else 0, seq.tokens, i)
            seq.hashes.append(h)
            if h not in self.cached and table[i] not in self.block_hash:  # else: that prefix is cached already
                self.cached[h], self.block_hash[table[i]] = table[i], h
