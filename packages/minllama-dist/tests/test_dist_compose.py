"""The compositions of the splits, against the oracle of one process training the same model on the same global
batches with the same AdamW: on 4 forked ranks pipeline x tensor parallel (pp=2, tp=2), context x tensor parallel
(cp=2, tp=2) and pipeline x context parallel (pp=2, cp=2); on 8, the 3-D meshes pp x dp_shard x tp and
pp x cp x tp (2 x 2 x 2). Gradients are compared unclipped (clipping to norm 1 would hide a gradient scaled by any
factor)."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_helpers import RecordingAdamW, ok, run_ranks, tiny_model
from minllama.dist import (TokenBatches, build_mesh, build_pipeline, load_checkpoint, parallelize_llama,
                           pipeline_train_step, plan_mesh, save_checkpoint, train_step)
from minllama.dist.context_parallel import apply_context_parallel, context_parallel_loss, cp_train_step

STEPS = 3
BATCH, SEQ = 4, 16
CPU = torch.device("cpu")
# The layouts sum in other orders (1e-7 apart after step 1); AdamW's update (~lr per weight, nearly whatever the
# gradient's size) carries that into the next steps' gradients in proportion to lr: measured on CP x TP, 2e-5 at
# lr=1e-2 and under 5e-6 at 3e-3 (the learning rate of test_dist_tp_train and test_dist_ring_attention)
LR = 3e-3


def batches(position: int = 0, seq_len: int = SEQ) -> TokenBatches:
    g = torch.Generator().manual_seed(1)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=seq_len, global_batch=BATCH,
                        position=position)


def single_process(steps: int = STEPS, clip: float | None = None, seq_len: int = SEQ):
    model = tiny_model("tiny-gqa")
    opt = RecordingAdamW(model, lr=LR)
    data = batches(seq_len=seq_len)
    losses = [train_step(model, opt, data.next_for_rank(), max_grad_norm=clip) for _ in range(steps)]
    return losses, opt.seen, model


def assert_equal_to_single_process(runs, steps=STEPS):
    losses, grads, _ = single_process(steps)
    assert len(set(losses)) == steps  # the oracle moves
    for r in runs:
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
        for step in range(steps):
            for name, g in r["grads"][step].items():  # each rank: the gradients of the parameters it holds
                torch.testing.assert_close(g, grads[step][name], atol=1e-5, rtol=1e-4, msg=f"{name} @ {step}")
    held = {name for r in runs for name in r["grads"][0]}
    assert held == set(grads[0]), set(grads[0]) ^ held  # every parameter was compared on some rank


def pipelined_train(pipe, seq_len: int = SEQ, clip: float | None = None, steps: int = STEPS):
    """``steps`` AdamW steps of a pipeline on this replica's rows; returns (losses, the recording optimizer, the
    data position reached)."""
    opt = RecordingAdamW(pipe.model, lr=LR)
    data = batches(seq_len=seq_len)
    losses = [pipeline_train_step(pipe, opt, data.next_for_rank(pipe.dp_rank, pipe.dp_size), max_grad_norm=clip)
              for _ in range(steps)]
    return losses, opt, data.position


def assert_checkpoint_continues_one_process(ckpt):
    """A checkpoint saved after STEPS steps (weights + AdamW moments), loaded into one process, continues the
    one-process run exactly: DCP across meshes."""
    ref_losses, _, ref = single_process(STEPS + 1)
    model = tiny_model("tiny-gqa", seed=7)  # other weights: the load must replace them all
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    state = load_checkpoint(ckpt, model, opt)
    assert state["optimizer_restored"] and len(opt.state) == len(list(model.parameters()))
    data = batches(state["data_position"])
    assert train_step(model, opt, data.next_for_rank(), max_grad_norm=None) == pytest.approx(ref_losses[-1],
                                                                                             abs=1e-5)
    for k, v in ref.state_dict().items():  # (Adam's first steps amplify 1e-7 gradient noise: see test_dist_fsdp)
        torch.testing.assert_close(model.state_dict()[k], v, atol=3e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- pipeline x TP
def pp_tp_worker(rank, world, ckpt):
    mesh = build_mesh(plan_mesh(world, pp=2, tp=2))  # [[0, 1], [2, 3]]: stage 0 on ranks 0, 1; stage 1 on 2, 3
    pipe = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "1f1b", microbatches=2)
    received = []  # what the second stage's first block is given: the slice sent by the first stage
    if "1" in pipe.model.layers:
        pipe.model.layers["1"].register_forward_pre_hook(lambda m, args: received.append(tuple(args[0].shape)))
    losses, opt, position = pipelined_train(pipe)
    save_checkpoint(ckpt, pipe.model, opt, {"data_position": position})
    logits_sharded = pipe.model.output is not None and isinstance(pipe.model.output.weight, DTensor)
    clipped = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "gpipe", microbatches=2)  # the norm: over tp and pp
    clip_opt = torch.optim.AdamW(clipped.model.parameters(), lr=LR)
    data = batches()
    clipped_losses = [pipeline_train_step(clipped, clip_opt, data.next_for_rank(), max_grad_norm=1.0)
                      for _ in range(STEPS)]
    return {"losses": losses, "clipped_losses": clipped_losses, "grads": opt.seen, "received": received,
            "keys": sorted(pipe.model.state_dict()),
            "head_sharded": logits_sharded}


def test_pipeline_x_tensor_parallel_equals_one_process_and_its_checkpoint_loads_in_one(tmp_path):
    runs = ok(run_ranks(pp_tp_worker, 4, str(tmp_path / "ckpt"), tmp=tmp_path, timeout=300))
    assert_equal_to_single_process(runs)
    clipped, _, _ = single_process(clip=1.0)
    assert all(r["clipped_losses"] == pytest.approx(clipped, abs=1e-5) for r in runs)
    # the stage boundary carries sequence-parallel slices: (micro-batch rows, T / tp, dim)
    dim = tiny_model().config.dim
    assert [r["received"][0] for r in runs[2:]] == [(BATCH // 2, SEQ // 2, dim)] * 2
    assert runs[0]["keys"] == runs[1]["keys"] != runs[2]["keys"] == runs[3]["keys"]
    assert [r["head_sharded"] for r in runs] == [False, False, True, True]  # the last stage: vocab-sharded head
    assert_checkpoint_continues_one_process(tmp_path / "ckpt")  # PP x TP -> one process


# ------------------------------------------------------------------------------------------ context x TP
def cp_tp_worker(rank, world):
    mesh = build_mesh(plan_mesh(world, cp=2, tp=2))  # rings {0, 2} and {1, 3}; tp pairs {0, 1} and {2, 3}
    model = parallelize_llama(tiny_model("tiny-gqa"), mesh)
    cp = model.context_parallel
    between_blocks, attended = [], []
    model.layers[0].register_forward_hook(lambda m, args, out: between_blocks.append(tuple(out.shape)))
    model.layers[0].attention.register_forward_hook(lambda m, args, out: attended.append(m.n_heads))
    opt = RecordingAdamW(model, lr=LR)
    data = batches()
    losses = [cp_train_step(model, opt, data.next_for_rank(), cp, max_grad_norm=None) for _ in range(STEPS)]
    return {"losses": losses, "grads": opt.seen, "between_blocks": between_blocks[0], "heads": attended[0],
            "ring": dist.get_process_group_ranks(cp.group)}


def test_context_x_tensor_parallel_equals_one_process(tmp_path):
    runs = ok(run_ranks(cp_tp_worker, 4, tmp=tmp_path, timeout=300))
    assert_equal_to_single_process(runs)
    cfg = tiny_model().config
    for r in runs:  # CP first (T/cp = 8 tokens per ring rank), then SP (8/tp = 4 between blocks)
        assert r["between_blocks"] == (BATCH, SEQ // 2 // 2, cfg.dim)
        assert r["heads"] == cfg.n_heads // 2  # the ring runs on the local heads
    assert [r["ring"] for r in runs] == [[0, 2], [1, 3], [0, 2], [1, 3]]


# -------------------------------------------------------------------------------------- pipeline x context
def pp_cp_worker(rank, world, ckpt):
    mesh = build_mesh(plan_mesh(world, pp=2, cp=2))  # [[0, 1], [2, 3]]: stage 0 is the ring {0, 1}, stage 1 {2, 3}
    pipe = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "1f1b", microbatches=2)
    received = []  # what the second stage's first block is given: one ring rank's tokens, sent by the first stage
    if "1" in pipe.model.layers:
        pipe.model.layers["1"].register_forward_pre_hook(lambda m, args: received.append(tuple(args[0].shape)))
    losses, opt, position = pipelined_train(pipe)
    save_checkpoint(ckpt, pipe.model, opt, {"data_position": position})
    # 15 tokens: the 2 x cp = 4 chunks are padded to 16; activation checkpointing runs the ring again in backward;
    # clipping sums the squared norm over the ring's FSDP shards and over the stages
    padded = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "gpipe", microbatches=2, activation_checkpointing=True)
    padded_losses, _, _ = pipelined_train(padded, seq_len=15, clip=1.0)
    return {"losses": losses, "grads": opt.seen, "received": received, "padded_losses": padded_losses,
            "ring": dist.get_process_group_ranks(pipe.context_parallel.group), "keys": sorted(pipe.model.state_dict())}


def test_pipeline_x_context_parallel_equals_one_process_and_its_checkpoint_loads_in_one(tmp_path):
    runs = ok(run_ranks(pp_cp_worker, 4, str(tmp_path / "ckpt"), tmp=tmp_path, timeout=300))
    assert_equal_to_single_process(runs)
    padded, _, _ = single_process(clip=1.0, seq_len=15)
    assert all(r["padded_losses"] == pytest.approx(padded, abs=1e-5) for r in runs)
    assert [r["ring"] for r in runs] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # each stage is a ring of its 2 ranks
    assert runs[0]["keys"] == runs[1]["keys"] != runs[2]["keys"] == runs[3]["keys"]
    # the stage boundary carries one ring rank's tokens: (micro-batch rows, T / cp, dim), the whole hidden size
    assert [r["received"][0] for r in runs[2:]] == [(BATCH // 2, SEQ // 2, tiny_model().config.dim)] * 2
    assert_checkpoint_continues_one_process(tmp_path / "ckpt")  # PP x CP -> one process


# --------------------------------------------------------------------------------------------- 3-D on 8 ranks
THREE_D = {"pp2xdp2xtp2": dict(pp=2, tp=2), "pp2xcp2xtp2": dict(pp=2, cp=2, tp=2)}


def three_d_worker(rank, world):
    out = {}
    for name, degrees in THREE_D.items():  # one fork of 8 ranks for both meshes (forking costs seconds)
        mesh = build_mesh(plan_mesh(world, **degrees))
        pipe = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "1f1b", microbatches=2)
        losses, opt, _ = pipelined_train(pipe)
        out[name] = {"losses": losses, "grads": opt.seen, "keys": sorted(pipe.model.state_dict()),
                     "local_numel": sum(p.to_local().numel() for p in pipe.model.parameters()),
                     "rows": (pipe.dp_rank, pipe.dp_size)}
    return out


@pytest.fixture(scope="module")
def three_d_runs(tmp_path_factory):
    return ok(run_ranks(three_d_worker, 8, tmp=tmp_path_factory.mktemp("3d"), timeout=600))


@pytest.mark.parametrize("name", list(THREE_D))  # (8 ranks on 2 cores, both meshes: about 13 s)
def test_three_d_meshes_on_eight_ranks_equal_one_process(three_d_runs, name):
    runs = [r[name] for r in three_d_runs]
    assert_equal_to_single_process(runs)
    full = tiny_model().state_dict()
    stage0 = sum(full[k].numel() for k in runs[0]["keys"])
    if name == "pp2xdp2xtp2":  # mesh [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]: (pp, dp_shard, tp)
        assert [r["rows"] for r in runs] == [(0, 2), (0, 2), (1, 2), (1, 2)] * 2  # the dp index picks the rows
        # a weight is split over tp, then over dp_shard; norms (replicated over tp) only over dp_shard
        assert runs[0]["local_numel"] < stage0 / 3
    else:  # (pp, cp, tp): each stage a ring of 2 x tp 2; every rank reads all the rows
        assert [r["rows"] for r in runs] == [(0, 1)] * 8


def test_a_window_whose_ring_share_does_not_split_over_tp_is_one_clear_error():
    # 20 tokens over cp=2: 4 chunks of 5, each ring rank 10 tokens, which sequence parallel cannot split over 4
    with pytest.raises(ValueError) as e:
        plan_mesh(8, cp=2, tp=4, seq_len=20)
    assert "--seq-len 20 over cp = 2 ranks gives each 10 tokens, which do not split over tp = 4" in str(e.value)
    assert "multiple of 2 * cp * tp = 16" in str(e.value)
    assert plan_mesh(4, cp=2, tp=2, seq_len=15).cp == 2  # 15 -> 4 chunks of 4 (padded): 8 per ring rank, 4 per tp


def ring_share_worker(rank, world):
    model = tiny_model("tiny-gqa")
    cp = apply_context_parallel(model)  # a ring of 1: each "rank" holds 2 chunks of ceil(T / 2)
    model.tp_size = 4  # what shard_for_training records: the guard reads it before any collective
    with pytest.raises(ValueError) as e:
        context_parallel_loss(model, cp, torch.zeros(1, 11, dtype=torch.long))  # 10 tokens -> L = 10
    return str(e.value)


def test_cp_loss_refuses_a_ring_share_that_sequence_parallel_cannot_split(tmp_path):
    message, = ok(run_ranks(ring_share_worker, 1, tmp=tmp_path))
    assert "10 tokens over a ring of 1 give 10 per rank, which sequence parallel cannot split over tp=4" in message
    assert "multiple of 2 * cp * tp = 8" in message
