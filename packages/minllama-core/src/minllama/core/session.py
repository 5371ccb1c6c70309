"""A conversation that keeps its KV cache between turns: each turn prefills only what the cache has not seen.

A chat prompt is the whole dialog so far, re-encoded every turn. Without a kept cache, turn n prefills turns 1..n
again; with one, it prefills only the new tokens. ``ChatSession`` compares the new prompt with the tokens the cache
holds (its ``history``), skips the shared prefix, and feeds the rest. When they disagree earlier (an answer
re-tokenized differently once it is part of the dialog, or cut by the token budget), the cache is rewound to the
shared prefix, which a static cache can always do (``KVCache.rewind``); a rolling cache (minllama-extend's
``StreamingChat``) can only while it has evicted nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from .cache import KVCache, StaticKVCache
from .generate import _cache_bucket, generate_stream
from .tokenizer_base import StreamDecoder


class ChatSession:
    """One cache for a whole conversation (by default a ``StaticKVCache`` of the model's context).

    ``stream_text(tokenizer, prompt, max_new_tokens, **sampling)`` has the interface of
    ``minllama.core.generate.stream_text``; ``last_prefill`` says how many prompt tokens the last turn fed."""

    def __init__(self, model, make_cache: Callable[[], KVCache] | None = None):
        self.model = model
        # by default a static cache that grows by powers of two (a short chat attends to few slots; a compiled
        # decode step recompiles only when it grows)
        self.make_cache = make_cache or (lambda: StaticKVCache(model, 1, min(256, model.config.max_seq_len)))
        self.cache = self.make_cache()
        self.history: list[int] = []  # exactly the tokens the cache holds, in order
        self.last_prefill = 0

    def _new_tokens(self, prompt: Sequence[int]) -> list[int]:
        prompt = list(prompt)
        common = 0
        for a, b in zip(self.history, prompt):
            if a != b:
                break
            common += 1
        new = prompt[common:]
        if not new:
            raise ValueError("the prompt adds nothing to the conversation; append a user message first")
        if common < len(self.history):  # go back to the shared prefix (if the cache cannot, the rest is fed on top)
            self.cache.rewind(common)
        self.history = prompt
        self.last_prefill = len(new)
        return new

    def stream_text(self, tokenizer, prompt: Sequence[int], max_new_tokens: int, *, on_token=None,
                    **sampling) -> Iterator[str]:
        """Yield the answer as text pieces; stop at the tokenizer's stop ids (not printed). ``sampling``:
        temperature, top_k, top_p, generator, compile (as for ``generate_stream``)."""
        decoder, stop = StreamDecoder(tokenizer), set(tokenizer.stop_ids)
        new = self._new_tokens(prompt)
        needed = min(len(self.history) + max_new_tokens, self.model.config.max_seq_len)
        if isinstance(self.cache, StaticKVCache) and needed > self.cache.capacity:
            self.cache = self.cache.resized(min(_cache_bucket(needed), self.model.config.max_seq_len), self.model)
        answer, stopped = [], False
        try:
            for token in generate_stream(self.model, [new], max_new_tokens, stop_ids=stop, cache=self.cache,
                                         **sampling):
                t = int(token[0])
                if on_token is not None:
                    on_token(t)
                if t in stop:
                    stopped = True
                    break
                answer.append(t)
                yield decoder.push(t)
            yield decoder.flush()
        except (Exception, KeyboardInterrupt):  # mid-forward: the last position may be half written
            self.history += answer[:-1]
            n = min(len(self.history), self.cache.length - 1)
            if n >= 0 and self.cache.rewind(n):
                self.history = self.history[:n]
            else:
                self.reset()
            raise
        except GeneratorExit:  # the reader stopped early, at a yield: the same tokens were fed as below
            self.history += answer if stopped else answer[:-1]
            raise
        else:  # the history is what the cache has seen: every token before the last one generated
            self.history += answer if stopped else answer[:-1]

    def reset(self) -> None:
        self.cache, self.history = self.make_cache(), []
