"""Speculative decoding: a cheap draft guesses k tokens, the model checks all of them in ONE forward pass.

Decoding is memory-bound: a step reads every weight to produce one token, and a forward over k + 1 tokens costs
about the same as over one. So let a draft propose ``d1 .. dk`` and run the target once over ``[last, d1 .. dk]``:
that gives the target's distribution p_0 .. p_k after each prefix. Keep the longest prefix of the guesses the target
agrees with, then one more token from the target itself (a correction, or a bonus when all k were accepted). Each
forward pass yields between 1 and k + 1 tokens.

It changes nothing in what is generated:

- greedy: d_i is kept iff it is the target's argmax after the previous tokens, so the output is the target's own
  greedy output, token for token;
- sampling (Leviathan et al. 2023, Chen et al. 2023): d_i, drawn from the draft's q_i, is kept with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn from max(0, p_i - q_i), renormalized. The
  kept-or-corrected token is then distributed exactly as p_i (``accept`` below; tested statistically).

Two drafts: ``ModelDraft`` (a smaller or quantized model with the same tokenizer) and ``LookupDraft`` (prompt lookup:
the tokens that followed the last occurrence of the current n-gram earlier in the text; free, and good when the
answer copies from the prompt, as in summaries or code edits). Batch 1; the caches roll back by resetting their
length (stale slots beyond it are masked, then overwritten).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .cache import StaticKVCache
from .generate import _cache_bucket, check_generation_args, distribution, draw


def accept(p: Tensor, q: Tensor | None, drafted: Sequence[int], generator=None) -> tuple[int, int]:
    """Verify ``drafted`` (k tokens) against the target's p (k + 1, vocab); q (k, vocab) is the draft's
    distribution (None: a deterministic draft, q = one-hot). Returns (how many drafts are kept, the next token)."""
    for i, d in enumerate(drafted):
        q_d = 1.0 if q is None else float(q[i, d])
        if torch.rand((), generator=generator, device=p.device) * q_d < p[i, d]:  # u < p/q without dividing by 0
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q exactly: any choice is distributed as p
            residual = p[i]
        return i, int(draw(residual[None] / residual.sum(), generator)[0])
    return len(drafted), int(draw(p[len(drafted)][None], generator)[0])  # all kept: a bonus token from p_k


class LookupDraft:
    """Prompt lookup: find the last ``n``-gram (n = max_ngram .. 1) earlier in the text and propose what followed."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int, **_) -> tuple[list[int], Tensor | None]:
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the most recent earlier occurrence
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k], None
        return [], None

    def rollback(self, n_tokens: int) -> None:
        pass


class ModelDraft:
    """A smaller model proposes k tokens one at a time from its own cache (which follows the accepted text)."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def propose(self, tokens: list[int], k: int, temperature=0.0, top_k=None, top_p=None,
                generator=None) -> tuple[list[int], Tensor | None]:
        if self.cache is None:
            self.cache = StaticKVCache(self.model, 1, self.model.config.max_seq_len)
        device = self.model.norm.weight.device
        k = min(k, self.cache.capacity - len(tokens))
        new = torch.tensor([tokens[self.cache.length:]], device=device)  # what it has not seen yet
        logits = self.model(new, self.cache.reserve(new.shape[1], device), cache=self.cache, last_only=True)[:, -1]
        drafted, probs = [], []
        for i in range(k):
            if temperature > 0:
                q = distribution(logits, temperature, top_k, top_p)[0]
                probs.append(q)
                token = int(draw(q[None], generator)[0])
            else:
                token = int(logits.argmax(-1)[0])
            drafted.append(token)
            if i < k - 1:
                logits = self.model(torch.tensor([[token]], device=device), self.cache.reserve(1, device),
                                    cache=self.cache)[:, -1]
        self.cache.length = min(self.cache.length, len(tokens))  # it holds the text only up to the proposal
        return drafted, (torch.stack(probs) if probs else None)

    def rollback(self, n_tokens: int) -> None:
        if self.cache is not None:
            self.cache.length = min(self.cache.length, n_tokens)


@torch.no_grad()
def speculative_generate(model, prompt: Sequence[int], max_new_tokens: int, draft, *, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         stop_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                         stats: dict | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` tokens after ``prompt`` (one prompt), as ``generate`` would, with ``draft``
    (``ModelDraft`` or ``LookupDraft``) proposing ``k`` tokens per target forward. ``stats``, if given, receives
    the counts: target forwards, drafted and accepted tokens."""
    cfg, device = model.config, model.norm.weight.device
    check_generation_args([prompt], max_new_tokens, cfg.vocab_size, temperature=temperature, top_k=top_k,
                          top_p=top_p)
    if len(prompt) >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the model's context is {cfg.max_seq_len}")
    max_new_tokens = min(int(max_new_tokens), cfg.max_seq_len - len(prompt))
    stop, tokens = set(stop_ids), list(prompt)
    stats = stats if stats is not None else {}
    stats.update(forwards=0, drafted=0, accepted=0)
    cache = StaticKVCache(model, 1, min(_cache_bucket(len(prompt) + max_new_tokens + k + 1), cfg.max_seq_len))
    if len(tokens) > 1:  # invariant: the cache holds every token but the last one
        model.hidden_states(torch.tensor([tokens[:-1]], device=device), cache.reserve(len(tokens) - 1, device),
                            cache=cache)
    produced = 0
    while produced < max_new_tokens:
        room = min(k, max_new_tokens - produced - 1, cache.capacity - len(tokens))
        drafted, q = draft.propose(tokens, max(room, 0), temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator) if room > 0 else ([], None)
        feed = torch.tensor([tokens[-1:] + drafted], device=device)  # (1, 1 + k): the last token, then the guesses
        logits = model(feed, cache.reserve(feed.shape[1], device), cache=cache)[0]  # (1 + k, vocab): p_0 .. p_k
        stats["forwards"] += 1
        if temperature > 0:
            kept, nxt = accept(distribution(logits, temperature, top_k, top_p), q, drafted, generator)
        else:
            target = logits.argmax(-1).tolist()
            kept = next((i for i, d in enumerate(drafted) if d != target[i]), len(drafted))
            nxt = target[kept]
        stats["drafted"] += len(drafted)
        stats["accepted"] += kept
        for token in drafted[:kept] + [nxt]:
            yield token
            produced += 1
            tokens.append(token)
            if token in stop or produced == max_new_tokens:
                return
        cache.length = len(tokens) - 1  # roll back what the target saw past the last accepted guess
        draft.rollback(len(tokens) - 1)
