"""Text generation: prefill the prompt once, then decode one token at a time from the KV cache.

    cache = StaticKVCache(model, B, max_len)                        generation owns the cache
    prefill:  model(prompt (B, T), input_pos=0..T-1, cache=cache)   -> logits of the last position, cache filled
    decode:   model(token (B, 1), input_pos=[t], cache=cache)       -> logits, one cache slot written per step

Prompts of different lengths are batched by padding on the left, so that every row's last prompt token sits in
the same slot; ``MinimalLlama`` masks the padding and restarts each row's positions at 0 after it, which makes each
row compute exactly what it would alone.
"""
from __future__ import annotations

import math
import numbers
import operator
import types
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .cache import KVCache, StaticKVCache
from .memory import release_free_memory
from .model import MinimalLlama

NAN_LOGITS = ("the model produced NaN logits: its weights or activations are not finite (a damaged checkpoint, or "
              "an overflow in float16: try bfloat16 or float32)")


def distribution(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """The probabilities ``sample`` draws from (temperature > 0): softmax(logits / temperature), truncated to the
    k most likely tokens (top-k) and/or to the smallest set whose probability reaches p (top-p, "nucleus").
    Truncation removes the long tail of unlikely tokens that makes sampled text derail. (B, vocab) -> (B, vocab)"""
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):  # None or 0: no top-k truncation
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus is already complete
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from probabilities (B, vocab) -> (B,); NaN (a broken model) is a ValueError."""
    try:  # multinomial checks its input on the host anyway: NaN logits (NaN probabilities) are caught here for free
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise ValueError(NAN_LOGITS) from None


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token of each row from logits (B, vocab) -> (B,).

    temperature 0 is greedy (argmax); otherwise a draw from ``distribution(logits, temperature, top_k, top_p)``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(distribution(logits, temperature, top_k, top_p), generator)


def _index(value) -> int | None:
    """value as an int if it is one (int, numpy integer, 0-d integer tensor), else None; bools are not ints here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_generation_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int, *,
                          temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                          pad_id: int = 0) -> None:
    """Raise one ValueError naming the first bad argument; ``generate_stream`` calls it once, before the prefill.

    Without it, a NaN or infinite temperature samples uniformly at random, a float ``max_new_tokens`` fails deep in
    ``range``, and a token id outside the vocabulary is an IndexError on the CPU (a device-side assert on CUDA)."""
    n = _index(max_new_tokens)
    if n is None or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy decoding), got {temperature!r}")
    if top_k is not None and ((k := _index(top_k)) is None or k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: no top-k truncation), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 or None: no top-p truncation), got {top_p!r}")
    if (p := _index(pad_id)) is None or not 0 <= p < vocab_size:
        raise ValueError(f"pad_id must be a token id in [0, {vocab_size}), got {pad_id!r}")
    nonempty = lambda x: not isinstance(x, str) and hasattr(x, "__len__") and len(x) > 0  # noqa: E731
    if not nonempty(prompts) or not all(nonempty(p) for p in prompts):
        raise ValueError("prompts must be a non-empty list of prompts, each a non-empty list of token ids "
                         "(one prompt: [ids])")
    for row, prompt in enumerate(prompts):
        for i, token in enumerate(prompt):
            if (t := _index(token)) is None or not 0 <= t < vocab_size:
                raise ValueError(f"prompts[{row}][{i}] = {token!r} is not a token id of this model "
                                 f"(an integer in [0, {vocab_size})): was the prompt encoded with another tokenizer?")


# A CPU prompt of this many tokens or more gives its freed activations' pages back (``memory.py``): SmolLM2's
# 512-token prompt left ~25 MB of holes that the next call's cache did not fit, so a benchmark's resident size grew
# with every call. The call takes ~0.5 ms, and the next prompt faults its pages in again: 1.5% of a 512-token
# prefill (measured: 451 -> 458 ms in fp32, 124 -> 126 ms in bf16).
RELEASE_AFTER_TOKENS = 128


def _cache_bucket(n: int) -> int:
    """Cache length for n tokens: a power of two, at least 256. With ``compile``, a chat whose prompt grows
    recompiles the decode step (whose shapes are the cache's) only when it crosses a power of two: a handful of
    times per context."""
    return max(256, 1 << (n - 1).bit_length())


def _decode_step(model: MinimalLlama, token: Tensor, input_pos: Tensor, pad: Tensor | None,
                 cache: KVCache) -> Tensor:
    return model(token, input_pos, pad, cache=cache)[:, -1]  # (B, vocab)


def compiled_decode_step(model: MinimalLlama):
    """The decode step, compiled once per model. Its shapes are those of the static KV cache, so it recompiles only
    for a cache of another size (the next power-of-two bucket, another batch size); a new cache of the same shape
    reuses it.

    torch.compile keeps the versions it compiles on the Python *code object* it traced, and allows at most
    ``torch._dynamo.config.recompile_limit`` (8) of them per code object. Shared by every model, ``_decode_step``
    would fail on the 9th model compiled in one process (a benchmark comparing schemes, a notebook); each model gets
    its own copy of the code instead, and its compiled versions go away with the model."""
    if getattr(model, "_compiled_decode_step", None) is None:
        own_code = types.FunctionType(_decode_step.__code__.replace(), _decode_step.__globals__, "_decode_step")
        model._compiled_decode_step = torch.compile(own_code, fullgraph=True, dynamic=False)
    return model._compiled_decode_step


@torch.no_grad()
def generate_stream(model: MinimalLlama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    stop_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                    compile: bool = False, pad_id: int = 0, cache: KVCache | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), until every row has produced a stop id or the budget is spent.

    Rows that already stopped keep producing tokens until the whole batch is done: callers cut each row at its
    first stop id (``generate`` does). Bad arguments are a ValueError before any work (``check_generation_args``),
    and so are NaN logits (a broken model), instead of a token.

    ``cache``: by default a ``StaticKVCache`` made for this call. Pass your own to continue where it stopped (the
    prompts are then only the new tokens) or to use another kind, e.g. extend's rolling ``SinkKVCache``, whose
    room never runs out; a prompt longer than ``cache.max_chunk`` is fed in chunks.
    """
    cfg, device = model.config, model.rope.device
    check_generation_args(prompts, max_new_tokens, cfg.vocab_size, temperature=temperature, top_k=top_k,
                          top_p=top_p, pad_id=pad_id)
    lengths = [len(p) for p in prompts]
    T, B = max(lengths), len(prompts)
    held = 0 if cache is None else cache.length  # tokens a caller's cache already holds (earlier turns)
    bounded = cache is None or cache.room(cfg.max_seq_len + 1) <= cfg.max_seq_len  # a rolling cache is not
    if bounded and held + T >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {held + T} tokens but the model's context is {cfg.max_seq_len}: "
                         f"shorten the prompt (or reset the conversation) to leave room for an answer")
    if cache is None:  # compiled: a power-of-two length, so that other lengths reuse the compiled step
        needed = T + int(max_new_tokens)
        cache = StaticKVCache(model, B, min(_cache_bucket(needed) if compile else needed, cfg.max_seq_len))
    elif cache.room(T + 1) < T + 1:
        raise ValueError(f"the prompt has {T} tokens but the cache has room for {cache.room(T + 1)} more: "
                         f"shorten the prompt (or reset the conversation) to leave room for an answer")
    max_new_tokens = cache.room(T + int(max_new_tokens)) - T  # int: a numpy integer is fine too
    tokens = torch.tensor([[pad_id] * (T - n) + list(p) for n, p in zip(lengths, prompts)], device=device)
    pad = torch.tensor([T - n for n in lengths], device=device) if len(set(lengths)) > 1 else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = compiled_decode_step(model) if compile else _decode_step

    chunk = getattr(cache, "max_chunk", None) or T
    for i in range(0, T, chunk):  # prefill: (B, vocab)
        piece = tokens[:, i:i + chunk]
        logits = model(piece, cache.reserve(piece.shape[1], device), pad, last_only=True, cache=cache)[:, -1]
    if device.type == "cpu" and B * T >= RELEASE_AFTER_TOKENS:  # its activations, freed, left holes in the heap
        release_free_memory()
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        done |= torch.isin(token, stop)
        # the one host sync of a step: have all rows stopped, and are the logits NaN (argmax would return a token
        # anyway). max propagates NaN: ~40 us at SmolLM2's vocab on a CPU (isnan().any(): ~300 us), 0.1% of a step
        finished, nan = torch.stack([done.all(), logits.amax().isnan()]).tolist()
        if nan:
            raise ValueError(NAN_LOGITS)
        yield token
        if finished or i == max_new_tokens - 1:
            break
        logits = step(model, token[:, None], cache.reserve(1, device), pad, cache)


def generate(model: MinimalLlama, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             stop_ids: Iterable[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             **kwargs) -> list[list[int]]:
    """Generate for a batch of prompts; returns each row's new tokens, cut after its first stop id.

    ``stop_strings`` (needs ``tokenizer``) also end a row: its tokens are cut right after the token that
    completed the string. Other keyword arguments go to ``generate_stream``.
    """
    stop_ids = set(stop_ids)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for token in generate_stream(model, prompts, max_new_tokens, stop_ids=stop_ids, **kwargs):
        for row, t in enumerate(token.tolist()):
            if finished[row]:
                continue
            out[row].append(t)
            if t in stop_ids or (stop_strings and any(s in tokenizer.decode(out[row]) for s in stop_strings)):
                finished[row] = True
        if all(finished):
            break
    return out


def stream_text(model: MinimalLlama, tokenizer, prompt: Sequence[int], max_new_tokens: int, *,
                stop_strings: Sequence[str] = (), on_token=None, **kwargs) -> Iterator[str]:
    """Yield the answer to one prompt as text pieces, as soon as they are valid UTF-8 and cannot be the start of a
    stop string. Stops at the tokenizer's stop ids (end of turn) and at ``stop_strings`` (not printed).
    ``on_token(id)`` is called for every generated token (e.g. to count tokens/s)."""
    from .tokenizer_base import StreamDecoder

    decoder, pending = StreamDecoder(tokenizer), ""
    stop_ids = set(kwargs.pop("stop_ids", ())) | set(tokenizer.stop_ids)
    for token in generate_stream(model, [prompt], max_new_tokens, stop_ids=stop_ids, **kwargs):
        t = int(token[0])
        if on_token is not None:
            on_token(t)
        if t in stop_ids:
            break
        pending += decoder.push(t)
        hits = [pending.index(s) for s in stop_strings if s in pending]
        if hits:
            yield pending[:min(hits)]
            return
        # hold back the longest tail that could still grow into a stop string
        hold = max((k for s in stop_strings for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    yield pending + decoder.flush()
