"""The engine against its oracle: every request gives what ``generate`` gives for that prompt alone, whatever the
interleaving of arrivals, the pool size (preemption), the prefix sharing; and every block comes back."""
import random

import pytest
import torch

from core_helpers import tiny_model
from minllama.core.engine import Engine, Request
from minllama.core.generate import generate
from minllama.core.paged_cache import PagedKVCache


def prompts_of(n, seed=0, lo=1, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(model, prompts, n):
    return [generate(model, [p], n)[0] for p in prompts]


def assert_drained(engine):
    pool = engine.cache.pool
    assert engine.idle and not engine.cache.tables
    assert all(r == 0 for r in pool.refs)  # no sequence holds a block
    assert len(pool.free) + len(engine.cached) == pool.n_blocks  # free, or kept for the prefix cache: none leaked
    assert len(set(pool.free)) == len(pool.free)


@torch.no_grad()
def test_paged_cache_decoding_equals_full_recomputation():
    model = tiny_model("tiny-gqa")
    cache = PagedKVCache(model, n_blocks=12, block_size=4)
    a, b = torch.randint(0, 256, (1, 13)), torch.randint(0, 256, (1, 6))
    cache.add(0), cache.add(1)
    model(a[:, :9], cache.prepare([0], 9), cache=cache)  # different lengths, then one batched step at a time
    model(b[:, :2], cache.prepare([1], 2), cache=cache)
    for t in range(4):
        tokens = torch.stack([a[0, 9 + t:10 + t], b[0, 2 + t:3 + t]])
        logits = model(tokens, cache.prepare([0, 1], 1), cache=cache)
        torch.testing.assert_close(logits[0, -1], model(a[:, :10 + t])[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1, -1], model(b[:, :3 + t])[0, -1], atol=1e-5, rtol=1e-5)
    assert len(cache.tables[0]) == 4 and len(cache.tables[1]) == 2  # 13 and 6 tokens in blocks of 4
    cache.remove(0), cache.remove(1)
    assert cache.pool.n_free() == 12


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3"])
def test_every_request_gets_its_one_at_a_time_answer(name):
    model = tiny_model(name)
    prompts = prompts_of(9, seed=1)
    engine = Engine(model, n_blocks=64, block_size=8, max_batch=4, prefill_chunk=16)
    assert engine.generate(prompts, 12) == alone(model, prompts, 12)
    assert engine.stats["decode_steps"] < 9 * 12  # rows really were batched
    assert_drained(engine)


def test_arrivals_at_random_steps_and_cancellation():
    model = tiny_model("tiny-mqa")
    prompts = prompts_of(12, seed=2)
    engine = Engine(model, n_blocks=80, block_size=4, max_batch=5, prefill_chunk=7)
    rng, pending, requests = random.Random(3), list(prompts), []
    while pending or not engine.idle:
        for _ in range(rng.randint(0, 2)):  # 0-2 new requests arrive before each step
            if pending:
                budget = 30 if len(requests) == 5 else rng.randint(1, 10)
                requests.append(engine.submit(Request(pending.pop(0), max_new_tokens=budget)))
        engine.step()
        if len(requests) > 5 and not requests[5].done and len(requests[5].output) >= 3:
            engine.cancel(requests[5])  # a client goes away mid-answer
    for r in requests:
        if r.finish_reason == "cancelled":
            assert r.output == alone(model, [r.prompt], len(r.output))[0]
        else:
            assert r.finish_reason == "length" and r.output == alone(model, [r.prompt], r.max_new_tokens)[0]
    assert requests[5].finish_reason == "cancelled"
    assert_drained(engine)


def test_a_small_pool_preempts_and_recomputes_with_the_same_answers():
    model = tiny_model("tiny-gqa")
    prompts = prompts_of(6, seed=4, lo=10, hi=30)
    engine = Engine(model, n_blocks=14, block_size=4, max_batch=6, prefix_caching=False)
    assert engine.generate(prompts, 16) == alone(model, prompts, 16)
    assert engine.stats["preempted"] > 0
    assert_drained(engine)


def test_stop_ids_and_sampling_settings_are_per_request():
    model = tiny_model("tiny-gqa")
    p = prompts_of(3, seed=5)
    greedy = alone(model, p, 10)
    engine = Engine(model, n_blocks=40, block_size=8)
    stop_at = Request(p[0], 10, stop_ids=[greedy[0][3]])
    sampled = Request(p[1], 10, temperature=1.0, top_k=20, seed=7)
    plain = Request(p[2], 10)
    for r in (stop_at, sampled, plain):
        engine.submit(r)
    engine.run()
    cut = greedy[0].index(greedy[0][3]) + 1
    assert stop_at.output == greedy[0][:cut] and stop_at.finish_reason == "stop"
    assert plain.output == greedy[2]
    g = torch.Generator().manual_seed(7)
    assert sampled.output == generate(model, [p[1]], 10, temperature=1.0, top_k=20, generator=g)[0]


def test_a_shared_prefix_is_computed_once():
    model = tiny_model("tiny-llama3")
    system = prompts_of(1, seed=6, lo=40, hi=40)[0]
    questions = prompts_of(4, seed=7, lo=3, hi=9)
    engine = Engine(model, n_blocks=64, block_size=8, max_batch=4)
    first = engine.generate([system + questions[0]], 6)
    before = engine.stats["prefilled"]
    rest = engine.generate([system + q for q in questions[1:]], 6)
    assert first + rest == alone(model, [system + q for q in questions], 6)
    assert engine.stats["from_cache"] == 3 * 40  # the 5 full blocks of the system prompt, for each later request
    assert engine.stats["prefilled"] - before < 3 * 9  # only the questions were prefilled
    assert_drained(engine)


def test_requests_that_arrive_together_share_the_prefix_the_first_one_computes():
    """A burst: all four are admitted before any block is cached. The first one's prefill fills the cache and the
    other three take its blocks at their own first prefill chunk, so the system prompt is computed once."""
    model = tiny_model("tiny-llama3")
    system = prompts_of(1, seed=6, lo=40, hi=40)[0]
    questions = prompts_of(4, seed=7, lo=3, hi=9)
    engine = Engine(model, n_blocks=64, block_size=8, max_batch=4, prefill_chunk=64)
    prompts = [system + q for q in questions]
    assert engine.generate(prompts, 6) == alone(model, prompts, 6)
    assert engine.stats["from_cache"] == 3 * 40
    assert engine.stats["prefilled"] == sum(len(p) - 1 for p in prompts) - 3 * 40
    assert_drained(engine)


def test_bad_requests_are_refused_before_any_work():
    model = tiny_model("tiny-gqa")
    engine = Engine(model, n_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request([1] * model.config.max_seq_len))
    with pytest.raises(ValueError, match="more KV blocks than the whole pool"):
        engine.submit(Request([1] * 20))
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(Request([1, 2], temperature=float("nan")))
    assert engine.idle
