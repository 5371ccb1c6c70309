"""A DCP save never loses the last checkpoint: kill -9 at every file-system step of a re-save, and at random moments,
leaves the old checkpoint or the new one, bit-exact (model and optimizer), and the next save removes what the kill
left. One process without a process group (DCP's no_dist mode), forked."""
import functools
import os
import random
import shutil
import signal
import time

import pytest
import torch

from dist_helpers import tiny_model
from minllama.core import CheckpointError
from minllama.core.saving import JOURNAL
from minllama.core.testing import kill_during
from minllama.dist import CheckpointManager, check_checkpoint, load_checkpoint, read_config, save_checkpoint

TOKENS = torch.arange(24).view(2, 12)


def trained(seed: int):
    """A model and an AdamW with state (moments, step count): what a resume needs bit-exact."""
    model = tiny_model(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(seed + 1):  # a different step count too
        model(TOKENS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def snapshot(model, opt) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optim": {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]}


def same(a: dict, b: dict) -> bool:
    if a["model"].keys() != b["model"].keys() or a["optim"].keys() != b["optim"].keys() or a["groups"] != b["groups"]:
        return False
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and all(
        a["optim"][i].keys() == b["optim"][i].keys() and all(torch.equal(a["optim"][i][k], b["optim"][i][k])
                                                             for k in a["optim"][i]) for i in a["optim"])


def load_into_fresh(load) -> tuple[dict, dict]:
    """(train state, snapshot) of a fresh model + optimizer after ``load(model, opt)``."""
    model = tiny_model(seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load(model, opt)
    assert state["optimizer_restored"]
    return state, snapshot(model, opt)


FS_STEPS = ("replace", "rename", "unlink", "fsync", "rmdir", "mkdir")


in_child = functools.partial(kill_during, steps=FS_STEPS)  # DCP's own writes (mkdir, rmdir) count too


@pytest.fixture(scope="module")
def states():
    """Two checkpointable states (old: seed 0, one step; new: seed 1, two steps) and their snapshots."""
    torch.set_num_threads(1)  # forked children inherit no thread pool surprises
    pairs = [trained(0), trained(1)]
    return pairs, [snapshot(m, o) for m, o in pairs]


def which(got: tuple[dict, dict], snaps: list[dict], steps=(1, 2)) -> str:
    state, snap = got
    for name, want, step in zip(("old", "new"), snaps, steps):
        if same(snap, want):
            assert state["step"] == step, "the train state of one save with the tensors of another"
            return name
    raise AssertionError("the checkpoint loads neither the old nor the new state: a mix, or garbage")


@pytest.mark.parametrize("how", ["save_checkpoint", "manager"])
def test_a_kill_at_every_step_of_a_save_leaves_the_old_or_the_new_checkpoint(how, states, tmp_path):
    """save_checkpoint: step_1 saved again over itself (the journal). manager: step_2 saved next to step_1, which
    keep=1 then prunes; the reader is load_latest."""
    (old, new), snaps = states
    manager = CheckpointManager(tmp_path, keep=1)
    folder = tmp_path / "step_00000001"
    if how == "save_checkpoint":
        save = lambda pair, step: save_checkpoint(folder, *pair, {"step": step})  # noqa: E731
        load = lambda: load_into_fresh(lambda m, o: load_checkpoint(folder, m, o))  # noqa: E731
    else:
        def save(pair, step):
            if step == 1:  # back to the old state: step_1 alone (the test's reset, not a save's work)
                shutil.rmtree(tmp_path / "step_00000002", ignore_errors=True)
            manager.save(step, *pair)

        load = lambda: load_into_fresh(manager.load_latest)  # noqa: E731
    outcomes, left_temporaries = [], 0
    for k in range(1, 400):
        save(old, 1)  # (over what the previous kill left: this save must remove its temporaries)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
        assert which(load(), snaps) == "old"
        killed = in_child(lambda: save(new, 2), die_at_call=k)
        left_temporaries += len(list(tmp_path.iterdir())) > 1
        outcomes.append(which(load(), snaps))
        assert not (folder / JOURNAL).exists()  # the reader finished the interrupted publish
        if not killed:
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes[-1] == "new" and outcomes.count("old") > 1 and outcomes.count("new") > 1  # both sides
    assert left_temporaries > 1
    print(f"{how}: killed at {len(outcomes) - 1} file-system steps: {outcomes.count('old')} old, "
          f"{outcomes.count('new')} new; {left_temporaries} kills left temporaries, removed by the next save")


def test_kills_at_random_moments_of_a_resave(states, tmp_path):
    """Real kill -9 from outside, at random moments of re-saves that follow each other."""
    pairs, snaps = states
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, *pairs[0], {"step": 1})
    rng = random.Random(0)
    seen = set()
    for trial in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(1000):
                    save_checkpoint(folder, *pairs[(trial + i) % 2], {"step": (trial + i) % 2 + 1})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(which(load_into_fresh(lambda m, o: load_checkpoint(folder, m, o)), snaps))
    assert seen == {"old", "new"}
    save_checkpoint(folder, *pairs[0], {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_manager_kills_at_random_moments(states, tmp_path):
    """Saves of steps 1, 2, 3, 1, ... (new folders, re-saves, pruning) killed at random: every listed checkpoint
    is whole and holds what was saved under its step."""
    pairs, snaps = states
    rng = random.Random(1)
    for trial in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                manager = CheckpointManager(tmp_path, keep=2)
                for i in range(1000):
                    step = (trial + i) % 3 + 1
                    manager.save(step, *pairs[step % 2], {"marker": step % 2 + 1})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        manager = CheckpointManager(tmp_path, keep=2)
        found = manager.checkpoints()
        assert found
        for path in found:
            state, snap = load_into_fresh(lambda m, o: load_checkpoint(path, m, o))
            step = int(path.name.removeprefix("step_"))
            assert state["step"] == step and same(snap, snaps[step % 2]), path.name
    manager.save(3, *pairs[1])
    assert all(p.name.startswith("step_") for p in tmp_path.iterdir())


# ------------------------------------------------------------------------------- what earlier versions left
def test_a_checkpoint_left_aside_by_an_earlier_version_is_put_back(states, tmp_path):
    """Earlier versions renamed step_N to .step_N.old, then the new one into place: a kill between the two renames
    left no step_N, the only copy hidden in .step_N.old (and the complete new one in .step_N.tmp)."""
    (old, new), snaps = states
    for reader in ("check", "load", "read_config", "manager"):
        root = tmp_path / reader
        save_checkpoint(root / "step_00000001", *old, {"step": 1})
        save_checkpoint(root / "new", *new, {"step": 2})
        os.rename(root / "step_00000001", root / ".step_00000001.old")
        os.rename(root / "new", root / ".step_00000001.tmp")
        folder = root / "step_00000001"
        with pytest.warns(UserWarning, match="restored from .step_00000001.old"):
            if reader == "check":
                assert check_checkpoint(folder)["step"] == 1
            elif reader == "load":
                assert which(load_into_fresh(lambda m, o: load_checkpoint(folder, m, o)), snaps) == "old"
            elif reader == "read_config":
                assert read_config(folder) == old[0].config
            else:
                assert CheckpointManager(root).checkpoints() == [folder]
        assert which(load_into_fresh(lambda m, o: load_checkpoint(folder, m, o)), snaps) == "old"
        shutil.copytree(folder, root / ".step_00000001.old")  # killed after its second rename: both exist
        save_checkpoint(folder, *new, {"step": 2})
        assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # .tmp and the stale .old removed
        assert which(load_into_fresh(lambda m, o: load_checkpoint(folder, m, o)), snaps) == "new"


# ------------------------------------------------------------------------------------------- what is replaced
def test_a_resave_replaces_only_the_files_a_save_writes(states, tmp_path):
    (old, new), snaps = states
    folder = tmp_path / "step_00000001"
    save_checkpoint(folder, *old, {"step": 1})
    (folder / "notes.txt").write_text("mine")
    (folder / "__1_0.distcp").write_bytes(b"a shard of rank 1 of an earlier, 2-rank save")
    (folder / "rng" / "rank1.pt").write_bytes(b"its RNG state")
    save_checkpoint(folder, *new, {"step": 2})
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        [".metadata", "__0_0.distcp", "notes.txt", "rng/rank0.pt", "train_state.json"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert which(load_into_fresh(lambda m, o: load_checkpoint(folder, m, o)), snaps) == "new"


def test_a_folder_that_holds_something_else_is_refused(states, tmp_path):
    (old, _), _ = states
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to save into .*home: it is not empty and holds no DCP"):
        save_checkpoint(tmp_path / "home", *old, {"step": 1})
    assert os.listdir(tmp_path / "home") == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no staging folder made either
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(tmp_path / "file", *old, {"step": 1})
    save_checkpoint(tmp_path / "empty", *old, {"step": 1})  # a new or empty folder is fine
    assert check_checkpoint(tmp_path / "empty")["step"] == 1
