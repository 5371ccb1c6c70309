"""Smoke tests of apps/train.py, run as a user would: one process, then torchrun with 2 CPU ranks killed and
resumed."""
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import ENV, losses, train

APPS = Path(__file__).parents[1]
SMALL = ["--steps", "6", "--ckpt-every", "3", "--sample-every", "6", "--seq-len", "32", "--batch-size", "4"]



def test_train_two_ranks_killed_and_resumed_match_one_unbroken_process(tmp_path):
    single = train(*SMALL, "--out", str(tmp_path / "one"), "--export-hf", str(tmp_path / "hf"))
    assert single.returncode == 0, single.stderr
    assert "[step 6] 'The fox" in single.stdout  # a sample was printed
    unbroken = losses(tmp_path / "one")
    assert len(unbroken) == 6 and unbroken[-1] < unbroken[0] - 0.5  # it learns

    killed = train(*SMALL, "--out", str(tmp_path / "two"), "--crash-at-step", "4", ranks=2)
    assert killed.returncode != 0  # rank 0 SIGKILLed itself after step 4; torchrun stops the other rank
    assert len(losses(tmp_path / "two")) == 4
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000003"]

    resumed = train(*SMALL, "--out", str(tmp_path / "two"), ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    # sharded over 2 ranks, killed and resumed == one process, never interrupted
    assert losses(tmp_path / "two") == pytest.approx(unbroken, abs=1e-5)

    # a run with other settings in the same --out is refused, before anything is loaded or written
    for change, word in [(["--batch-size", "2"], "batch_size"), (["--lr", "1e-3"], "'lr'"),
                         (["--corpus", str(APPS / "README.md")], "corpus"), (["--seed", "1"], "seed")]:
        other = train(*SMALL[:-2], *change, "--out", str(tmp_path / "two"))
        assert other.returncode != 0 and "holds a run with other settings" in other.stderr, other.stderr
        assert word in other.stderr and "its own --out" in other.stderr and "Traceback" not in other.stderr
    other = train(*SMALL, "--config", "tiny-mha", "--out", str(tmp_path / "two"))  # another model
    assert other.returncode != 0 and "holds another model" in other.stderr and "Traceback" not in other.stderr
    assert len(losses(tmp_path / "two")) == 6  # untouched
    again = train(*SMALL, "--out", str(tmp_path / "two"))  # the same command once more: says there is nothing to do
    assert again.returncode == 0 and "already at step 6" in again.stderr, again.stderr

    from minllama.core import load_pretrained  # the exported model loads in core
    model, _ = load_pretrained(tmp_path / "hf")
    assert model.config.vocab_size == 256


def test_train_bad_arguments_are_one_clear_line(tmp_path):
    for args in (["--corpus", str(tmp_path / "missing.txt")], ["--config", "tiny-nope"], ["--seq-len", "4096"]):
        out = train(*args, "--out", str(tmp_path / "x"))
        assert out.returncode != 0
        assert out.stderr.strip().splitlines()[-1].startswith("error: "), out.stderr
    (tmp_path / "y" / "checkpoints" / "step_00000005").mkdir(parents=True)  # a damaged (empty) checkpoint
    out = train("--out", str(tmp_path / "y"), "--steps", "6")
    assert out.returncode != 0 and "error: " in out.stderr and "incomplete checkpoint" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_train_help_documents_the_options():
    out = train("--help")
    for option in ["--steps", "--ckpt-every", "--batch-size", "--bf16", "--async-save", "--activation-checkpointing",
                   "--export-hf", "--fresh", "torchrun", "--tp", "--dp-shard", "--pp", "--cp"]:
        assert option in out.stdout


def test_bench_dist_prints_the_comparison():
    out = subprocess.run([sys.executable, str(APPS / "bench_dist.py"), "--dim", "128", "--layers", "2", "--vocab",
                          "512", "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=APPS.parent, env=ENV)
    assert out.returncode == 0, out.stderr
    lines = {line.split("  ")[0]: line.split() for line in out.stdout.splitlines()}
    assert "load average before" in out.stdout and "load average after" in out.stdout
    ddp, fsdp = lines["unsharded (DDP)"], lines["FSDP2, prefetch 1"]
    assert float(fsdp[-6]) == pytest.approx(float(ddp[-6]) / 2, rel=0.02)  # parameters: half per rank on 2 ranks


@pytest.mark.slow
def test_train_fsdp_x_tp_resumes_on_other_meshes(tmp_path):
    """4 ranks (dp_shard 2 x tp 2) killed after step 4, resumed by 2 ranks (tp 2), finished by one process: the
    loss curve is the unbroken single process's (to float rounding: the layouts sum in other orders)."""
    single = train(*SMALL, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    out = tmp_path / "moved"
    killed = train(*SMALL, "--tp", "2", "--out", str(out), "--crash-at-step", "4", ranks=4)
    assert killed.returncode != 0 and len(losses(out)) == 4
    tp_only = train(*SMALL[:1], "5", *SMALL[2:], "--tp", "2", "--out", str(out), ranks=2)
    assert tp_only.returncode == 0 and "step 3" in tp_only.stderr and "tp=2" in tp_only.stderr, tp_only.stderr
    alone = train(*SMALL, "--out", str(out))
    assert alone.returncode == 0 and "step 5" in alone.stderr, alone.stderr
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    sample = [line for line in single.stdout.splitlines() if line.startswith("[step 6]")]
    assert sample and sample[0] in alone.stdout  # sampling through the sharded model: the same greedy text


def test_train_bad_mesh_is_one_clear_line(tmp_path):
    """Checked before any process group: WORLD_SIZE (what torchrun sets) is enough to reject a mesh."""
    cases = [({}, ["--tp", "3"], "does not divide the world size 1"),
             ({}, ["--dp-shard", "2"], "leave --dp-shard out"),
             ({}, ["--pp", "2"], "pp x cp x tp = 2 x 1 x 1 = 2 does not divide the world size 1"),
             ({"WORLD_SIZE": "4"}, ["--tp", "4"], "n_kv_heads=2 does not split over --tp 4 ranks"),
             ({"WORLD_SIZE": "2"}, ["--tp", "2", "--seq-len", "33"], "--seq-len 33 does not split"),
             ({"WORLD_SIZE": "4"}, ["--tp", "2", "--batch-size", "3"], "multiple of the 2 data-parallel groups"),
             # pp 2 x cp 2 on 8 ranks: 2 data-parallel groups (the ranks of a ring share their rows)
             ({"WORLD_SIZE": "8"}, ["--pp", "2", "--cp", "2", "--batch-size", "3"],
              "multiple of the 2 data-parallel groups")]
    for env, args, message in cases:
        out = subprocess.run([sys.executable, str(APPS / "train.py"), *args, "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120, cwd=APPS.parent, env={**ENV, **env})
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, out.stderr
