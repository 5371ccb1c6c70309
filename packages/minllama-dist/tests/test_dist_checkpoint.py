"""DCP checkpoints: resume equivalence, N->M resharding, conversion to/from core formats, damaged directories."""
import shutil

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import minllama.dist.checkpoint as ckpt_mod
from dist_helpers import ok, run_ranks, tiny_model
from minllama.core import CheckpointError, load_pretrained, save_hf
from minllama.dist import (CheckpointManager, TokenBatches, apply_fsdp, core_to_dcp, data_parallel_mesh, dcp_to_hf,
                           dcp_to_meta, dcp_to_model, load_checkpoint, load_pretrained_sharded, save_checkpoint,
                           train_step)


def batches(position: int = 0) -> TokenBatches:
    g = torch.Generator().manual_seed(1)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=16, global_batch=4, position=position)


def full_weights(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def sharded(seed: int = 0, name: str = "tiny-gqa"):
    model = apply_fsdp(tiny_model(name, seed=seed), data_parallel_mesh(torch.device("cpu")))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_worker(rank, world, root, steps, save_at, resume, async_save):
    """Train `steps` steps from scratch, or resume from the latest checkpoint; checkpoint after step `save_at`."""
    model, opt = sharded(seed=7 if resume else 0)  # a resumed run starts from other weights: the load must fix it
    manager = CheckpointManager(root, keep=2, async_save=async_save)
    data, start, losses = batches(), 0, []
    if resume:
        state = manager.load_latest(model, opt)
        start, data.position = state["step"], state["data_position"]
        assert state["optimizer_restored"]
    for step in range(start + 1, steps + 1):
        losses.append(train_step(model, opt, data.next_for_rank(rank, world)))
        if step == save_at:  # async: the next steps run (and change the weights) while the save is in flight
            manager.save(step, model, opt, {"data_position": data.position})
    manager.wait()
    return {"losses": losses, "weights": full_weights(model)}


def test_kill_and_resume_reproduces_the_unbroken_run(tmp_path):
    run = lambda *args: ok(run_ranks(train_worker, 2, *args, tmp=tmp_path))[0]  # noqa: E731
    unbroken = run(tmp_path / "a", 6, 3, False, True)  # saves step 3 asynchronously, trains on
    crashed = run(tmp_path / "b", 4, 3, False, False)  # saves step 3, then "dies" after step 4
    resumed = run(tmp_path / "b", 6, 3, True, False)
    resumed_async = run(tmp_path / "a", 6, 3, True, False)  # from the asynchronously written checkpoint
    assert crashed["losses"] == unbroken["losses"][:4]
    for r in (resumed, resumed_async):
        assert r["losses"] == pytest.approx(unbroken["losses"][3:], abs=1e-6)
        for k, v in unbroken["weights"].items():
            torch.testing.assert_close(r["weights"][k], v, atol=1e-6, rtol=0)
    assert [p.name for p in CheckpointManager(tmp_path / "b").checkpoints()] == ["step_00000003"]


def save_sharded_worker(rank, world, path):
    """2 ranks: train 2 steps, save, then one more step; return the weights at the save and the next loss."""
    model, opt = sharded()
    data = batches()
    for _ in range(2):
        train_step(model, opt, data.next_for_rank(rank, world))
    save_checkpoint(path, model, opt, {"step": 2, "data_position": data.position})
    saved = full_weights(model)
    return {"saved": saved, "next_loss": train_step(model, opt, data.next_for_rank(rank, world))}


def test_reshard_2_to_1_and_convert_to_hf_and_meta(tmp_path):
    path = tmp_path / "ckpt"
    r0 = ok(run_ranks(save_sharded_worker, 2, path, tmp=tmp_path))[0]
    # 2 -> 1: one plain process, no process group, an unsharded model and optimizer
    model = tiny_model(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_checkpoint(path, model, opt)
    assert state["step"] == 2 and state["world_size"] == 2 and state["optimizer_restored"]
    for k, v in r0["saved"].items():
        assert torch.equal(model.state_dict()[k], v), k
    data = batches(state["data_position"])
    assert train_step(model, opt, data.next_for_rank()) == pytest.approx(r0["next_loss"], abs=1e-5)  # optimizer too
    # DCP -> HF and Meta -> core's loader: identical weights
    dcp_to_hf(path, tmp_path / "hf")
    dcp_to_meta(path, tmp_path / "meta")
    for out in ("hf", "meta"):
        loaded, _ = load_pretrained(tmp_path / out)
        for k, v in r0["saved"].items():
            assert torch.equal(loaded.state_dict()[k], v), (out, k)
    # and back: HF -> DCP -> the same weights
    core_to_dcp(tmp_path / "hf", tmp_path / "back")
    back = dcp_to_model(tmp_path / "back")
    for k, v in r0["saved"].items():
        assert torch.equal(back.state_dict()[k], v), k


def load_sharded_worker(rank, world, path):
    model, opt = sharded(seed=9)
    state = load_checkpoint(path, model, opt)
    data = batches(state["data_position"])
    weights = full_weights(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    return {"weights": weights, "next_loss": train_step(model, opt, data.next_for_rank(rank, world)), "local": local}


def test_reshard_1_to_2(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches()
    for _ in range(2):
        train_step(model, opt, data.next_for_rank())
    save_checkpoint(tmp_path / "ckpt", model, opt, {"step": 2, "data_position": data.position})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    next_loss = train_step(model, opt, data.next_for_rank())
    for r in ok(run_ranks(load_sharded_worker, 2, tmp_path / "ckpt", tmp=tmp_path)):
        for k, v in saved.items():
            assert torch.equal(r["weights"][k], v), k
        assert r["next_loss"] == pytest.approx(next_loss, abs=1e-5)
        assert r["local"] <= model.num_params() // 2 + 64


def pretrained_worker(rank, world, source):
    model = load_pretrained_sharded(source, lambda m: apply_fsdp(m, data_parallel_mesh(torch.device("cpu"))),
                                    torch.device("cpu"))
    local = sum(p.to_local().numel() for p in model.parameters())  # (before a forward: the root stays gathered)
    tokens = torch.arange(20).view(2, 10)
    return {"weights": full_weights(model), "logits": model(tokens).detach(), "local": local}


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mqa"])
def test_load_pretrained_into_sharded_model_by_broadcast(tmp_path, name):
    ref = tiny_model(name, seed=3).eval()
    save_hf(ref, tmp_path / "hf")
    for r in ok(run_ranks(pretrained_worker, 2, tmp_path / "hf", tmp=tmp_path)):
        for k, v in ref.state_dict().items():
            assert torch.equal(r["weights"][k], v), k
        torch.testing.assert_close(r["logits"], ref(torch.arange(20).view(2, 10)), atol=1e-5, rtol=1e-5)
        assert r["local"] <= ref.num_params() // 2 + 64  # each rank ends up holding only its half


def _truncate_shard(p):
    f = sorted(p.glob("*.distcp"))[-1]
    f.write_bytes(f.read_bytes()[:100])


def _garbage_metadata(p):
    (p / ".metadata").write_bytes(b"not a pickle")


DAMAGE = {  # what happened to the directory -> the words the error must contain
    "missing .metadata": (lambda p: (p / ".metadata").unlink(), "incomplete checkpoint"),
    "missing train_state.json": (lambda p: (p / "train_state.json").unlink(), "incomplete checkpoint"),
    "truncated shard": (_truncate_shard, "truncated"),
    "missing shard": (lambda p: sorted(p.glob("*.distcp"))[0].unlink(), "is missing"),
    "garbage .metadata": (_garbage_metadata, "is corrupt"),
    "no directory": (lambda p: shutil.rmtree(p), "no such checkpoint"),
}


def damaged_worker(rank, world, root):
    """Save a good 2-rank checkpoint, damage copies of it (rank 0), then try to load each one on both ranks."""
    save_sharded_worker(rank, world, root / "good")
    if rank == 0:
        for i, (damage, _) in enumerate(DAMAGE.values()):
            shutil.copytree(root / "good", root / f"bad{i}")
            damage(root / f"bad{i}")
    torch.distributed.barrier()
    outcome = []
    for i in range(-1, len(DAMAGE)):
        model, opt = sharded()
        try:
            load_checkpoint(root / ("good" if i < 0 else f"bad{i}"), model, opt)
            outcome.append("loaded")
        except CheckpointError as e:
            outcome.append(str(e))
    return outcome


def test_damaged_checkpoint_is_a_clear_error_on_every_rank_never_a_hang(tmp_path):
    for outcome in ok(run_ranks(damaged_worker, 2, tmp_path, tmp=tmp_path, timeout=120)):
        assert outcome[0] == "loaded"
        for (what, (_, message)), error in zip(DAMAGE.items(), outcome[1:]):
            assert message in error, (what, error)
    with pytest.raises(CheckpointError, match="holds another model"):  # weights of another shape
        load_checkpoint(tmp_path / "good", tiny_model("tiny-mha"))


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(1, model, opt, {"data_position": 1})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    real_save = ckpt_mod.dcp.save

    def crash_midway(state, checkpoint_id, **kwargs):  # some bytes hit the disk, then the process "dies"
        (ckpt_mod.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    with torch.no_grad():
        model.norm.weight.add_(1.0)
    monkeypatch.setattr(ckpt_mod.dcp, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, model, opt, {"data_position": 2})
    assert manager.latest().name == "step_00000001"  # the temp directory is not a checkpoint
    restored = tiny_model(seed=4)
    assert load_checkpoint(manager.latest(), restored)["step"] == 1
    for k, v in good.items():
        assert torch.equal(restored.state_dict()[k], v)
    monkeypatch.setattr(ckpt_mod.dcp, "save", real_save)
    for step in (2, 3):
        manager.save(step, model, opt, {"data_position": step})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002", "step_00000003"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]  # kept 2, temp removed


def test_tied_head_round_trips_through_dcp_hf_and_meta(tmp_path):
    ref = tiny_model("tiny-mqa", seed=2)  # output.weight *is* tok_embeddings.weight
    save_hf(ref, tmp_path / "hf")
    core_to_dcp(tmp_path / "hf", tmp_path / "dcp")
    model = tiny_model("tiny-mqa", seed=8)
    state = load_checkpoint(tmp_path / "dcp", model, torch.optim.AdamW(model.parameters()))
    assert state["step"] == 0 and not state["optimizer_restored"]  # converted checkpoints hold weights only
    dcp_to_meta(tmp_path / "dcp", tmp_path / "meta")
    meta, _ = load_pretrained(tmp_path / "meta")
    for m in (model, meta):
        assert m.output.weight is m.tok_embeddings.weight
        for k, v in ref.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
