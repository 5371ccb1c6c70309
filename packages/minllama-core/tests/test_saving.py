"""Saves never lose data: other files are kept, permissions too, and a kill -9 at any moment of a save leaves the
old checkpoint or the new one (bit-exact), never a mix and never nothing."""
import json
import os
import random
import signal
import time

import pytest
import torch

from core_helpers import tiny_model
from minllama.core import saving
from minllama.core.checkpoint import CheckpointError, load_pretrained, save_hf, save_meta
from minllama.core.testing import kill_during


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


class NamedTokenizer:
    """Writes a recognizable tokenizer file (the loader is not asked to read it in these tests)."""
    bos_id = eos_id = pad_id = None

    def __init__(self, text):
        self.text = text

    def save(self, directory):
        (directory / "tokenizer.json").write_text(self.text)


# ------------------------------------------------------------------------------------- other files are kept
def test_save_over_a_download_keeps_every_file_it_does_not_write(tmp_path):
    folder = tmp_path / "Llama-download"
    save_hf(tiny_model(seed=0), folder, tokenizer=NamedTokenizer("the original tokenizer"))
    extra = {"README.md": "# model card", "generation_config.json": '{"temperature": 0.6}', "notes.txt": "mine",
             "original/params.json": "{}"}
    for name, text in extra.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    folder.chmod(0o750)
    new = tiny_model(seed=1)
    save_hf(new, folder)  # no tokenizer given: the folder's own tokenizer.json stays
    for name, text in extra.items():
        assert (folder / name).read_text() == text, name
    assert (folder / "tokenizer.json").read_text() == "the original tokenizer"
    assert (folder.stat().st_mode & 0o777) == 0o750
    assert same_weights(new, load_pretrained(folder, with_tokenizer=False)[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_resave_removes_only_the_previous_saves_stale_files(tmp_path):
    folder = tmp_path / "hf"
    save_hf(tiny_model(seed=0), folder, max_shard_bytes=40_000)  # shards + index
    shards = [p.name for p in folder.glob("model-*.safetensors")]
    assert len(shards) > 2
    (folder / "extra.safetensors").write_bytes(b"not ours")
    new = tiny_model(seed=1)
    save_hf(new, folder, overwrite=True)  # one file: the old shards and index would be stale
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["config.json", "extra.safetensors", "model.safetensors"]
    (folder / "extra.safetensors").unlink()
    assert same_weights(new, load_pretrained(folder)[0])


def test_a_tokenizer_given_replaces_the_old_tokenizer_files(tmp_path):
    folder = tmp_path / "hf"
    save_hf(tiny_model(), folder)
    (folder / "tokenizer.model").write_bytes(b"an older tokenizer that would shadow tokenizer.json")
    save_hf(tiny_model(), folder, tokenizer=NamedTokenizer("new"))
    assert not (folder / "tokenizer.model").exists() and (folder / "tokenizer.json").read_text() == "new"


def test_a_folder_of_another_format_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "ckpt"
    save_hf(tiny_model(seed=0), folder)
    (folder / "README.md").write_text("card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(CheckpointError, match=r"refusing to write into .*holds config.json.* of another format"):
        save_meta(tiny_model(seed=1), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    new = tiny_model(seed=1)
    save_meta(new, folder, overwrite=True)  # the HF files go (they would shadow params.json), the card stays
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "consolidated.00.pth", "params.json"]
    assert same_weights(new, load_pretrained(folder)[0])
    with pytest.raises(CheckpointError, match="holds consolidated.00.pth, params.json of another format"):
        save_hf(new, folder)


def test_a_new_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_hf(tiny_model(), tmp_path / "a" / "b")
    finally:
        os.umask(umask)
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "b" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------- kill -9 tests
save_in_child = kill_during  # run a save in a child that kills itself at its n-th file-system step


def check_old_or_new(folder, old, new) -> str:
    loaded = load_pretrained(folder, with_tokenizer=False)[0]
    if same_weights(old, loaded):
        return "old"
    assert same_weights(new, loaded), "a mix of two saves"
    return "new"


@pytest.mark.parametrize("fmt", ["hf", "hf-sharded", "meta"])
def test_a_kill_at_every_step_of_a_save_leaves_the_old_or_the_new_checkpoint(fmt, tmp_path):
    save = {"hf": save_hf, "hf-sharded": lambda m, d: save_hf(m, d, max_shard_bytes=40_000),
            "meta": save_meta}[fmt]
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    folder = tmp_path / "ckpt"
    outcomes = []
    for k in range(1, 200):
        save(old, folder)
        killed = save_in_child(lambda: save(new, folder), die_at_call=k)
        outcomes.append(check_old_or_new(folder, old, new))
        assert not (folder / saving.JOURNAL).exists()  # the load finished the interrupted save
        if not killed:
            break
    else:
        pytest.fail("the save never completed")
    assert outcomes[-1] == "new" and "old" in outcomes and outcomes.count("new") > 1  # both sides of the commit
    save(old, folder)  # the next save removes every staging folder the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    print(f"{fmt}: killed at {len(outcomes) - 1} steps: {outcomes.count('old')} old, {outcomes.count('new')} new")


def test_kills_at_random_moments(tmp_path):
    """Real kill -9 from outside, at random moments of saves that follow each other."""
    models = [tiny_model(seed=s) for s in range(2)]
    folder = tmp_path / "ckpt"
    save_hf(models[0], folder)
    rng = random.Random(0)
    for trial in range(12):
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(1000):
                    save_hf(models[(trial + i) % 2], folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = load_pretrained(folder, with_tokenizer=False)[0]
        assert any(same_weights(m, loaded) for m in models)


# --------------------------------------------------------------------------------------------------- recovery
def test_recover_is_idempotent_and_refuses_a_crafted_journal(tmp_path):
    folder = tmp_path / "ckpt"
    save_hf(tiny_model(), folder)
    saving.recover(folder)  # nothing to do
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for plan in ({"staging": f".ckpt{saving._STAGING}0123abcd", "renames": [], "deletes": ["../victim.txt"]},
                 {"staging": "../../elsewhere", "renames": ["config.json"], "deletes": []}):
        (folder / saving.JOURNAL).write_text(json.dumps(plan))
        with pytest.raises(CheckpointError, match="refused|not a staging folder"):
            load_pretrained(folder)
        assert victim.read_text() == "keep me"
    (folder / saving.JOURNAL).unlink()
    (folder / "link").symlink_to(tmp_path)
    (folder / saving.JOURNAL).write_text(json.dumps(
        {"staging": f".ckpt{saving._STAGING}0123abcd", "renames": [], "deletes": ["link/victim.txt"]}))
    with pytest.raises(CheckpointError, match="a link leads out"):
        saving.recover(folder)
    assert victim.read_text() == "keep me"


def test_several_processes_may_finish_one_interrupted_save_at_once(tmp_path, monkeypatch):
    """Every rank of a job loads the same checkpoint, so every rank may find the same journal: whichever process
    moves a file first, the others must skip it (here the 'other process' runs its whole recover between our
    check that a staged file exists and our rename of it, and again before we read the journal)."""
    folder = tmp_path / "ckpt"
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    for interleave in ("before the rename", "before the journal is read"):
        save_hf(old, folder)
        with monkeypatch.context() as m:
            m.setattr(saving, "recover", lambda directory: None)  # the save dies right after its commit
            save_hf(new, folder)
        assert (folder / saving.JOURNAL).is_file()
        real_replace, real_read = os.replace, saving.Path.read_text

        def other_process_first(real, *args):
            monkeypatch.undo()  # the other process runs unhindered, to the end
            saving.recover(folder)
            return real(*args)

        if interleave == "before the rename":
            monkeypatch.setattr(saving.os, "replace", lambda *a: other_process_first(real_replace, *a))
        else:
            monkeypatch.setattr(saving.Path, "read_text", lambda *a: other_process_first(real_read, *a))
        saving.recover(folder)
        monkeypatch.undo()
        assert not (folder / saving.JOURNAL).exists()
        assert same_weights(new, load_pretrained(folder, with_tokenizer=False)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_copy_left_by_an_earlier_version_is_put_back(tmp_path):
    """Earlier versions renamed NAME to .NAME.old-XXXX first: a kill right then left no NAME at all."""
    model = tiny_model()
    save_hf(model, tmp_path / "ckpt")
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-abc123")
    (tmp_path / ".ckpt.tmp-def456").mkdir()  # the half-written new one
    with pytest.warns(UserWarning, match="restored"):
        assert same_weights(model, load_pretrained(tmp_path / "ckpt")[0])
    save_hf(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
