"""Context parallelism on 2 and 4 forked gloo ranks against one process: ring attention against
scaled_dot_product_attention on the whole sequence (value and dq, dk, dv), a CP training step of a tiny model against
the single-process step (loss, gradients, AdamW steps), CP prefill against the plain forward, and the errors."""
import pytest
import torch
import torch.nn.functional as F

from dist_helpers import ok, run_ranks, tiny_model
from minllama.dist import apply_fsdp, data_parallel_mesh, train_step
from minllama.dist.context_parallel import (RingLayout, apply_context_parallel, average_gradients,
                                            context_parallel_loss, context_parallel_training, cp_prefill,
                                            cp_train_step, ring_attention)

# (seq_len, n_heads, n_kv_heads, causal, block_rows, dtype): lengths that 2N does not divide, GQA / MHA / MQA, query
# tiles smaller than a block; one fp64 case shows the merge is exact, not just close; bf16 (--bf16 training)
# accumulates in fp32 and is compared with fp32 attention on the same bf16 numbers
CASES = [(13, 4, 2, True, 1024, torch.float32), (13, 4, 2, False, 1024, torch.float32),
         (16, 4, 4, True, 3, torch.float32), (21, 6, 1, False, 2, torch.float32), (3, 4, 2, True, 1024, torch.float32),
         (19, 4, 2, True, 4, torch.float64), (13, 4, 2, True, 4, torch.bfloat16)]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}


def qkv(seq_len, n_heads, n_kv_heads, dtype):
    """The whole sequence's q, k, v and an upstream gradient, the same on every rank and in the parent."""
    g = torch.Generator().manual_seed(seq_len * 100 + n_heads * 10 + n_kv_heads)
    q = torch.randn(2, n_heads, seq_len, 8, generator=g, dtype=torch.float64)  # (B, H, T, head_dim)
    k, v = (torch.randn(2, n_kv_heads, seq_len, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return [x.to(dtype) for x in (q, k, v, torch.randn(q.shape, generator=g, dtype=torch.float64))]


def attention_worker(rank, world):
    out = []
    for seq_len, n_heads, n_kv_heads, causal, block_rows, dtype in CASES:
        layout = RingLayout.load_balanced(seq_len, world)
        q, k, v, dout = (layout.shard(x, rank, dim=2) for x in qkv(seq_len, n_heads, n_kv_heads, dtype))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        y = ring_attention(q, k, v, layout, causal=causal, block_rows=block_rows)  # (B, H, L, head_dim)
        y.backward(dout)
        out.append([y.detach(), q.grad, k.grad, v.grad])
    errors = {}
    good = RingLayout.load_balanced(8, world)
    q, k, _, _ = (good.shard(x, rank, dim=2) for x in qkv(8, 4, 2, torch.float32))
    for name, call in {"ranks": lambda: ring_attention(q, k, k, RingLayout.load_balanced(8, world + 1)),
                       "tokens": lambda: ring_attention(q[:, :, :-1], k[:, :, :-1], k[:, :, :-1], good),
                       "heads": lambda: ring_attention(q[:, :3], k, k, good)}.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    return {"cases": out, "errors": errors}


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def attention_runs(request, tmp_path_factory):
    world = request.param
    return world, ok(run_ranks(attention_worker, world, tmp=tmp_path_factory.mktemp("ring")))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"T{c[0]}-H{c[1]}-G{c[2]}-{'causal' if c[3] else 'full'}-"
                                                         f"tile{c[4]}-{str(c[5])[6:]}" for c in CASES])
def test_ring_attention_equals_full_attention_value_and_gradients(attention_runs, case):
    world, runs = attention_runs
    seq_len, n_heads, n_kv_heads, causal, _, dtype = CASES[case]
    exact = torch.promote_types(dtype, torch.float32)  # the reference runs on the same numbers, in fp32 or fp64
    q, k, v, dout = (x.to(exact) for x in qkv(seq_len, n_heads, n_kv_heads, dtype))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=n_kv_heads != n_heads)
    y.backward(dout)
    layout = RingLayout.load_balanced(seq_len, world)
    tol = TOLERANCE[dtype]
    for i, (name, want) in enumerate(zip(["out", "dq", "dk", "dv"], [y.detach(), q.grad, k.grad, v.grad])):
        got = layout.unshard([run["cases"][case][i] for run in runs], dim=2).to(exact)  # the ranks' tokens, in order
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    assert q.grad.abs().max() > 0.1 and k.grad.abs().max() > 0.1  # not a vacuous comparison


def test_ring_attention_bad_input_is_one_clear_error(attention_runs):
    world, runs = attention_runs
    errors = runs[0]["errors"]
    assert f"over {world + 1} ranks, the group has {world}" in errors["ranks"]
    assert "shard the sequence with layout.shard" in errors["tokens"]
    assert "3 query heads do not share 2 kv heads" in errors["heads"]


def test_load_balanced_layout_gives_every_rank_equal_causal_work():
    assert len(set(RingLayout.load_balanced(64, 4).causal_work())) == 1
    for seq_len, world in [(64, 4), (61, 4), (32, 2)]:
        layout = RingLayout.load_balanced(seq_len, world)
        balanced, contiguous = layout.causal_work(), RingLayout.contiguous(seq_len, world).causal_work()
        assert sum(balanced) == sum(contiguous) == seq_len * (seq_len + 1) // 2  # every visible pair exactly once
        padding = layout.positions.numel() - seq_len  # padding queries (all on rank 0) count no work
        assert max(balanced) - min(balanced) <= padding * layout.positions.numel()  # 0 when 2N divides seq_len
        assert max(contiguous) > 2 * min(contiguous)  # contiguous: the last rank does about 2N-1 times the first's
    layout = RingLayout.load_balanced(10, 2)  # 4 chunks of 3 (2 padding): rank 0 holds chunks 0 and 3
    assert layout.positions.tolist() == [[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]]
    x = torch.arange(10)[None]
    assert layout.shard(x, 0, pad_value=-1).tolist() == [[0, 1, 2, 9, -1, -1]]
    assert torch.equal(layout.unshard([layout.shard(x, r) for r in range(2)]), x)


def test_ring_layout_refuses_unsorted_positions():
    with pytest.raises(ValueError, match="positions of each rank must be increasing"):
        RingLayout(torch.tensor([[0, 3], [2, 1]]), 4)
    with pytest.raises(ValueError, match="seq_len >= 1"):
        RingLayout.load_balanced(0, 2)


# ---- a tiny model: training and prefill ----

SEQ = 21  # 21 tokens per window (+1 target): 2N = 4 chunks do not divide it, so the last chunk is padded
STEPS = 3


def batch():
    return torch.randint(0, 256, (2, SEQ + 1), generator=torch.Generator().manual_seed(7))


def model_worker(rank, world):
    out = {}
    # plain model: a DDP-style gradient average over the ring
    model = tiny_model("tiny-gqa")
    cp = apply_context_parallel(model)
    context_parallel_loss(model, cp, batch()).backward()
    average_gradients(model, cp.group)
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    out["losses"] = [cp_train_step(model, opt, batch(), cp) for _ in range(STEPS)]
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    # FSDP2 over the same ranks (apps/train.py --cp): FSDP's average replaces average_gradients
    sharded = tiny_model("tiny-gqa")
    apply_fsdp(sharded, data_parallel_mesh(torch.device("cpu")))
    step, data_rank, data_world = context_parallel_training(sharded, world, 2)
    sopt = torch.optim.AdamW(sharded.parameters(), lr=3e-3, weight_decay=0.1)
    out["fsdp_losses"] = [step(sharded, sopt, batch()) for _ in range(STEPS)]
    out["fsdp_data"] = (data_rank, data_world)
    # activation checkpointing recomputes each block's forward during backward: the ring must still be there
    recomputed = tiny_model("tiny-gqa")
    apply_fsdp(recomputed, data_parallel_mesh(torch.device("cpu")), activation_checkpointing=True)
    step, _, _ = context_parallel_training(recomputed, world, 2)
    ropt = torch.optim.AdamW(recomputed.parameters(), lr=3e-3, weight_decay=0.1)
    out["recomputed_losses"] = [step(recomputed, ropt, batch()) for _ in range(STEPS)]
    # prefill: the last token's logits with the prompt split over the ring (tiny-llama3: scaled RoPE)
    for name in ("tiny-gqa", "tiny-llama3"):
        m = tiny_model(name).eval()
        out[f"prefill-{name}"] = cp_prefill(m, apply_context_parallel(m), batch()[:, :19])
    out["outside_a_sequence"] = model(batch()[:, :5]).detach()  # no layout active: core's attention
    with cp.sequence(8) as layout:
        local = layout.shard(batch()[:, :8], cp.rank)
        for name, call in {"pad": lambda: model(local, pad=torch.tensor([1, 0])),
                           "nested": lambda: cp.sequence(9).__enter__()}.items():
            try:
                call()
            except ValueError as e:
                out[f"{name}_error"] = str(e)
    try:
        context_parallel_training(tiny_model("tiny-gqa"), 3, 2)
    except ValueError as e:
        out["cp_error"] = str(e)
    try:
        context_parallel_training(tiny_model("tiny-gqa"), 1, 3)
    except ValueError as e:
        out["batch_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    return ok(run_ranks(model_worker, 2, tmp=tmp_path_factory.mktemp("cp-model")))


def single_process_reference():
    model = tiny_model("tiny-gqa")
    tokens = batch()
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = [train_step(model, opt, batch()) for _ in range(STEPS)]
    return model, grads, losses


def test_cp_training_equals_single_process(model_runs):
    model, grads, losses = single_process_reference()
    for run in model_runs:
        for name, g in grads.items():
            torch.testing.assert_close(run["grads"][name], g, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert run["losses"] == pytest.approx(losses, abs=1e-5)
        assert run["fsdp_losses"] == pytest.approx(losses, abs=1e-5)
        assert run["recomputed_losses"] == pytest.approx(losses, abs=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(run["weights"][name], p.detach(), atol=1e-5, rtol=1e-5)
    assert losses[-1] < losses[0] - 0.1  # it trains
    assert [run["fsdp_data"] for run in model_runs] == [(0, 1), (0, 1)]  # one ring: both ranks read the same rows


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3"])
def test_cp_prefill_equals_the_last_logits_of_one_process(model_runs, name):
    model = tiny_model(name).eval()
    want = model(batch()[:, :19], last_only=True)  # (B, 1, vocab)
    for run in model_runs:
        torch.testing.assert_close(run[f"prefill-{name}"], want, atol=1e-5, rtol=1e-5)


def test_cp_model_outside_a_sequence_is_the_plain_model(model_runs):
    model = tiny_model("tiny-gqa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(STEPS):
        train_step(model, opt, batch())
    torch.testing.assert_close(model_runs[0]["outside_a_sequence"], model(batch()[:, :5]), atol=1e-5, rtol=1e-5)


def test_cp_model_refuses_what_the_ring_cannot_do(model_runs):
    assert "no padding (pad), KV cache" in model_runs[0]["pad_error"]
    assert "a sequence of 8 tokens is active on this ring" in model_runs[0]["nested_error"]


def test_cp_training_bad_sizes_are_one_clear_error(model_runs):
    assert "--cp 3 does not divide the 2 ranks into rings: use --cp 1 or 2" in model_runs[0]["cp_error"]
    assert "--batch-size 3 must be a multiple of the 2 ranks" in model_runs[0]["batch_error"]


def test_a_kv_cache_inside_a_sequence_is_refused_even_for_a_first_prompt():
    # a first prompt into a cache attends over exactly its tokens (core's StaticKVCache), like a training pass, but
    # the cache would keep only this rank's chunk: refused before anything is written
    from types import SimpleNamespace

    from minllama.core.cache import StaticKVCache
    from minllama.dist.context_parallel import ContextParallelAttention

    model = tiny_model("tiny-gqa")
    for layer in model.layers:
        layer.attention.__class__ = ContextParallelAttention
        layer.attention.context_parallel = SimpleNamespace(layout=object(), group=None)  # a sequence is active
    cache = StaticKVCache(model, 1, 16)
    with pytest.raises(ValueError, match="no padding \\(pad\\), KV cache"):
        model(torch.tensor([[1, 2, 3]]), cache.reserve(3), cache=cache)
    assert not cache.k[0].any()


def test_apply_context_parallel_refuses_foreign_attention():
    model = tiny_model("tiny-gqa")
    model.layers[1].attention = torch.nn.Identity()
    with pytest.raises(TypeError, match="not core's Attention"):
        apply_context_parallel(model)  # refused before any process group is asked for anything
    assert type(model.layers[0].attention).__name__ == "Attention"  # and nothing was swapped


def rings_worker(rank, world):
    """4 ranks = 2 rings of 2 (apps/train.py --cp 2 on 4 ranks): FSDP over all 4, each ring reads its own row."""
    model = tiny_model("tiny-gqa")
    apply_fsdp(model, data_parallel_mesh(torch.device("cpu")))
    step, data_rank, data_world = context_parallel_training(model, 2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    rows = 2 // data_world
    losses = [step(model, opt, batch()[data_rank * rows:(data_rank + 1) * rows]) for _ in range(STEPS)]
    return {"losses": losses, "data": (data_rank, data_world)}


def test_two_rings_of_two_with_fsdp_equal_single_process(tmp_path):
    runs = ok(run_ranks(rings_worker, 4, tmp=tmp_path))
    _, _, losses = single_process_reference()
    assert [run["data"] for run in runs] == [(0, 2), (0, 2), (1, 2), (1, 2)]  # ranks 0,1 ring 0; ranks 2,3 ring 1
    for run in runs:
        assert run["losses"] == pytest.approx(losses, abs=1e-5)


def test_ring_attention_without_a_process_group_says_how_to_get_one():
    assert not torch.distributed.is_initialized()  # the tests fork their groups; this process never joins one
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="join one first"):
        ring_attention(q, q, q, RingLayout.load_balanced(4, 1))
