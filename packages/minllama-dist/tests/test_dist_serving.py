"""Tensor-parallel serving on 2 gloo ranks (lockstep engines) against one process: the same tokens for every request,
under staggered arrivals, a cancellation, greedy and sampled requests; the follower ends drained; a dead rank is an
error, not a hang."""
import os

import torch
import torch.distributed as dist

from dist_helpers import ok, run_ranks, tiny_model
from minllama.core.engine import Engine, Request
from minllama.core.generate import generate
from minllama.dist import apply_tensor_parallel, data_parallel_mesh
from minllama.dist.serving import FollowerLost, LockstepEngine, follow

PROMPTS = [[5, 17, 99, 3, 250, 8, 41, 9, 9, 12, 13], [12, 7, 200], list(range(30, 60)), [77] * 5, [1, 2, 3, 4]]
ENGINE = dict(n_blocks=40, block_size=4, max_batch=3, prefill_chunk=5)  # small: chunked prefill, waiting requests


def schedule(engine) -> list[Request]:
    """The same calls on one process or on rank 0: 3 requests, 2 steps, 2 more (sampled: seeded and unseeded),
    a cancellation, then to the end."""
    first = [engine.submit(Request(p, 12)) for p in PROMPTS[:3]]
    for _ in range(2):
        engine.step()
    later = [engine.submit(Request(PROMPTS[3], 10, temperature=1.0, top_k=50, seed=123)),
             engine.submit(Request(PROMPTS[4], 10, temperature=0.8, seed=getattr(engine, "unseeded", None)))]
    engine.step()
    engine.cancel(first[1])
    while not engine.idle:
        engine.step()
    return first + later


def tp_serving_worker(rank, world):
    model = apply_tensor_parallel(tiny_model("tiny-gqa").eval(), data_parallel_mesh(torch.device("cpu")))
    engine = Engine(model, **ENGINE)
    if rank:
        done = follow(engine)
        return {"done": done, "blocks_in_use": engine.blocks_in_use()}
    lockstep = LockstepEngine(engine)
    requests = schedule(lockstep)
    lockstep.close()
    return {"outputs": [r.output for r in requests], "reasons": [r.finish_reason for r in requests],
            "seeds": [r.seed for r in requests], "blocks_in_use": engine.blocks_in_use()}


def test_tensor_parallel_engines_answer_as_one_process(tmp_path):
    lead, follower = ok(run_ranks(tp_serving_worker, 2, tmp=tmp_path))
    model = tiny_model("tiny-gqa").eval()
    one = Engine(model, **ENGINE)
    one.unseeded = lead["seeds"][4]  # the seed rank 0 gave the unseeded request
    reference = schedule(one)
    assert lead["outputs"] == [r.output for r in reference]
    assert lead["reasons"] == [r.finish_reason for r in reference] and lead["reasons"][1] == "cancelled"
    for i in (0, 2):  # greedy, never cancelled: the answer of `generate` on that prompt alone
        assert lead["outputs"][i] == generate(model, [PROMPTS[i]], 12)[0]
    assert lead["outputs"][3] != lead["outputs"][4][:10] and len(lead["outputs"][3]) == 10  # sampled, really
    assert follower["done"]["submitted"] == 5 and follower["done"]["cancelled"] == 1
    assert lead["blocks_in_use"] == follower["blocks_in_use"] == 0  # both drained: no block leaked


def dead_follower_worker(rank, world):
    model = apply_tensor_parallel(tiny_model("tiny-gqa").eval(), data_parallel_mesh(torch.device("cpu")))
    engine = Engine(model, **ENGINE)
    if rank:
        dist.barrier()
        os._exit(0)  # a follower that dies without a word
    lockstep = LockstepEngine(engine)
    lockstep.submit(Request(PROMPTS[0], 4))
    dist.barrier()
    try:
        lockstep.step()
    except FollowerLost as e:
        return str(e)
    return "no error"


def test_a_dead_follower_is_a_clear_error_on_rank_0(tmp_path):
    results = run_ranks(dead_follower_worker, 2, tmp=tmp_path, timeout=90)
    assert "a tensor-parallel follower is gone" in results[0] and results[1]["type"] == "died"
