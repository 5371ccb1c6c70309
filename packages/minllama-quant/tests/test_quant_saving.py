"""save_quantized never loses data (core's saving.save_into): other files and the folder's permissions are kept,
another format's folder is refused unless overwrite=True, and a kill -9 at any moment of a save leaves the previous
quantized checkpoint or the new one, bit-exact, never a mix and never nothing."""
import os
import random
import signal
import time

import pytest
import torch

from minllama.core import saving
from minllama.core.checkpoint import CheckpointError, load_pretrained, save_hf
from minllama.core.testing import kill_during
from minllama.quant import load_quantized, quantize, save_quantized
from quant_helpers import tiny_model

TOKENS = torch.arange(12).view(1, 12) * 7 % 256


def quantized(scheme="int8", seed=0, **opts):
    return quantize(tiny_model("tiny-mqa", seed=seed), scheme, **opts)


def same_model(a, b) -> bool:
    """The same tensors, bit for bit, and the same logits."""
    sa, sb = a.state_dict(), b.state_dict()
    return (sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
            and torch.equal(a(TOKENS), b(TOKENS)))


def test_a_save_keeps_the_files_it_does_not_write_and_the_permissions(tmp_path):
    folder = tmp_path / "q"
    save_quantized(quantized(seed=0), folder)
    extra = {"README.md": "# model card", "tokenizer.json": '{"mine": true}', "notes/run.txt": "lr 1e-3"}
    for name, text in extra.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    folder.chmod(0o750)
    new = quantized(seed=1)
    save_quantized(new, folder)
    assert {name: (folder / name).read_text() for name in extra} == extra
    assert folder.stat().st_mode & 0o777 == 0o750
    assert same_model(new, load_quantized(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging folder left


def test_another_format_or_a_foreign_folder_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "ckpt"
    save_hf(tiny_model("tiny-mqa"), folder)
    (folder / "README.md").write_text("card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointError, match=r"refusing to write into .*holds config.json of another format"):
        save_quantized(quantized(), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    model = quantized()
    save_quantized(model, folder, overwrite=True)  # config.json goes (load_pretrained would pick it), the card stays
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "quant.json"]
    assert same_model(model, load_quantized(folder))

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CheckpointError, match="is not empty and has no quant.json"):
        save_quantized(model, other)
    assert [p.name for p in other.iterdir()] == ["cat.jpg"]


def test_a_new_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_quantized(quantized(), tmp_path / "a" / "q")
    finally:
        os.umask(umask)
    assert (tmp_path / "a" / "q").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "q" / "quant.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------ kill -9 tests
save_in_child = kill_during  # core's: a save in a child that kills itself at its n-th file-system step


@pytest.mark.parametrize("old_scheme,new_scheme", [("int8", "int8"), ("int8", "int4")])
def test_a_kill_at_every_step_of_a_save_leaves_the_old_or_the_new_checkpoint(old_scheme, new_scheme, tmp_path):
    """Same scheme, other weights: a mix of two saves would load, so only bit-exactness catches it. Other scheme:
    a mix would not even load."""
    old = quantized(old_scheme, seed=0)
    new = quantized(new_scheme, seed=1, **({"group_size": 32} if new_scheme == "int4" else {}))
    folder = tmp_path / "q"
    outcomes, left_staging = [], 0
    for k in range(1, 100):
        save_quantized(old, folder)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the save deleted what a killed one left
        killed = save_in_child(lambda: save_quantized(new, folder), die_at_call=k)
        left_staging += any(p.name.startswith(".q.staging-") for p in tmp_path.iterdir())
        loaded = load_quantized(folder)
        assert not (folder / saving.JOURNAL).exists()  # the load finished the interrupted save
        if same_model(old, loaded):
            outcomes.append("old")
        else:
            assert same_model(new, loaded), f"killed at step {k}: a mix of two saves"
            outcomes.append("new")
        if not killed:
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes[-1] == "new" and "old" in outcomes and outcomes.count("new") > 1  # both sides of the commit
    assert left_staging > 0  # kills before the commit left a staging folder, which the next save removed
    print(f"{old_scheme} -> {new_scheme}: killed at {len(outcomes) - 1} steps: {outcomes.count('old')} old, "
          f"{outcomes.count('new')} new, {left_staging} left a staging folder")


def test_kills_at_random_moments(tmp_path):
    """A real kill -9 from outside, at random moments of saves that follow each other."""
    models = [quantized(seed=s) for s in range(2)]
    folder = tmp_path / "q"
    save_quantized(models[0], folder)
    rng = random.Random(0)
    for trial in range(12):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(1000):
                    save_quantized(models[(trial + i) % 2], folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = load_quantized(folder)
        assert any(same_model(m, loaded) for m in models), f"trial {trial}: the checkpoint is neither save"
    save_quantized(models[0], folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_copy_left_by_an_earlier_version_is_put_back(tmp_path):
    """Earlier versions of save_quantized renamed q to .q.old-XXXX first: a kill right then left no q at all."""
    model = quantized()
    save_quantized(model, tmp_path / "q")
    os.rename(tmp_path / "q", tmp_path / ".q.old-abc123")
    (tmp_path / ".q.tmp-def456").mkdir()  # the half-written new one
    with pytest.warns(UserWarning, match="restored"):
        assert same_model(model, load_quantized(tmp_path / "q"))
    save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_quantized_folder_is_not_taken_for_a_float_checkpoint(tmp_path):
    """quant.json + model.safetensors is not an HF folder: core's loader says so instead of reading the codes."""
    save_quantized(quantized(), tmp_path / "q")
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_pretrained(tmp_path / "q")
