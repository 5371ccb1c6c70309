"""The 3-D compositions on 4 forked ranks, against the oracle of one process training the same model on the same
global batches with the same AdamW: pipeline x tensor parallel (pp=2, tp=2) and context x tensor parallel
(cp=2, tp=2). Gradients are compared unclipped (clipping to norm 1 would hide a gradient scaled by any factor)."""
import pytest
import torch
from torch.distributed.tensor import DTensor

from dist_helpers import ok, run_ranks, tiny_model
from minllama.dist import (TokenBatches, build_mesh, build_pipeline, load_checkpoint, pipeline_train_step,
                           plan_mesh, save_checkpoint, train_step)

STEPS = 3
BATCH, SEQ = 4, 16
CPU = torch.device("cpu")


def batches(position: int = 0) -> TokenBatches:
    g = torch.Generator().manual_seed(1)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=SEQ, global_batch=BATCH,
                        position=position)


def as_full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a (gathered) copy of every gradient it applies, by parameter name."""

    def __init__(self, model, **kw):
        self.named = list(model.named_parameters())
        self.seen: list[dict] = []
        super().__init__([p for _, p in self.named], **kw)

    def step(self, closure=None):
        self.seen.append({n: as_full(p.grad) for n, p in self.named})  # full_tensor: a collective over tp
        return super().step(closure)


def single_process(steps: int = STEPS, clip: float | None = None):
    model = tiny_model("tiny-gqa")
    opt = RecordingAdamW(model, lr=1e-2)
    data = batches()
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


# ---------------------------------------------------------------------------------------------- pipeline x TP
def pp_tp_worker(rank, world, ckpt):
    mesh = build_mesh(plan_mesh(world, pp=2, tp=2))  # [[0, 1], [2, 3]]: stage 0 on ranks 0, 1; stage 1 on 2, 3
    pipe = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "1f1b", microbatches=2)
    received = []  # what the second stage's first block is given: the slice sent by the first stage
    if "1" in pipe.model.layers:
        pipe.model.layers["1"].register_forward_pre_hook(lambda m, args: received.append(tuple(args[0].shape)))
    opt = RecordingAdamW(pipe.model, lr=1e-2)
    data = batches()
    losses = [pipeline_train_step(pipe, opt, data.next_for_rank(pipe.dp_rank, pipe.dp_size), max_grad_norm=None)
              for _ in range(STEPS)]
    save_checkpoint(ckpt, pipe.model, opt, {"data_position": data.position})
    logits_sharded = pipe.model.output is not None and isinstance(pipe.model.output.weight, DTensor)
    clipped = build_pipeline(tiny_model("tiny-gqa"), mesh, CPU, "gpipe", microbatches=2)  # the norm: over tp and pp
    clip_opt = torch.optim.AdamW(clipped.model.parameters(), lr=1e-2)
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
    # the PP x TP checkpoint (weights + AdamW moments) in one process continues exactly the one-process run
    ref_losses, _, ref = single_process(STEPS + 1)
    model = tiny_model("tiny-gqa", seed=7)  # other weights: the load must replace them all
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_checkpoint(tmp_path / "ckpt", model, opt)
    assert state["optimizer_restored"] and len(opt.state) == len(list(model.parameters()))
    data = batches(state["data_position"])
    assert train_step(model, opt, data.next_for_rank(), max_grad_norm=None) == pytest.approx(ref_losses[-1],
                                                                                             abs=1e-5)
    for k, v in ref.state_dict().items():  # (Adam's first steps amplify 1e-7 gradient noise: see test_dist_fsdp)
        torch.testing.assert_close(model.state_dict()[k], v, atol=3e-4, rtol=0)
