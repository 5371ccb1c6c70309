"""Tensor-parallel generation on 2 ranks against single-device greedy decoding of the same weights."""
import pytest
import torch

from dist_helpers import ok, run_ranks, tiny_model
from minllama.core import generate
from minllama.core.cache import StaticKVCache
from minllama.dist import apply_tensor_parallel, data_parallel_mesh

PROMPTS = [[5, 17, 99, 3, 250, 8, 41], [12, 7, 200]]  # different lengths: left padding and masks are exercised
NAMES = ["tiny-mha", "tiny-gqa", "tiny-llama3"]


def tp_worker(rank, world):
    out = {}
    for name in NAMES:
        model = apply_tensor_parallel(tiny_model(name).eval(), data_parallel_mesh(torch.device("cpu")))
        tokens = generate(model, PROMPTS, max_new_tokens=24)
        attn = model.layers[0].attention
        out[name] = {"tokens": tokens, "logits": model(torch.tensor([PROMPTS[0]])).detach(),
                     "local_wq": tuple(attn.wq.weight.to_local().shape), "cache": tuple(StaticKVCache(model, 2, 16).k[0].shape)}
    try:
        apply_tensor_parallel(tiny_model("tiny-mqa"), data_parallel_mesh(torch.device("cpu")))
    except ValueError as e:
        out["mqa_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    return ok(run_ranks(tp_worker, 2, tmp=tmp_path_factory.mktemp("tp")))


@pytest.mark.parametrize("name", NAMES)
def test_tensor_parallel_generation_equals_single_device(tp_runs, name):
    model = tiny_model(name).eval()
    expected = generate(model, PROMPTS, max_new_tokens=24)
    logits = model(torch.tensor([PROMPTS[0]]))
    cfg = model.config
    for run in tp_runs:
        r = run[name]
        assert r["tokens"] == expected
        torch.testing.assert_close(r["logits"], logits, atol=1e-5, rtol=1e-5)
        assert r["local_wq"] == (cfg.n_heads * cfg.head_dim // 2, cfg.dim)  # each rank: half the query heads
        assert r["cache"][1] == cfg.n_kv_heads // 2  # and half the kv heads in its cache
    assert len(set(map(tuple, expected))) > 1  # not a degenerate constant output


def test_tensor_parallel_refuses_heads_that_do_not_split(tp_runs):
    assert "n_kv_heads=1 does not split over 2 ranks" in tp_runs[0]["mqa_error"]
