"""Smoke tests of apps/finetune.py, run as a user would run it, with tiny settings (a few steps)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]
TINY = ["--steps", "2", "--batch-size", "2", "--train-examples", "8", "--eval-examples", "2", "--save-every", "1",
        "--layers", "2"]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, APPS / "finetune.py", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=APPS.parent)


def read_log(out: Path) -> list[dict]:
    with open(out / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_finetune_help_documents_every_option():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for option in ["--out", "--steps", "--batch-size", "--lr", "--rank", "--alpha", "--targets", "--layers",
                   "--resume", "--save-every", "--eval-examples"]:
        assert option in out.stdout


def test_finetune_runs_saves_everything_and_resumes(tmp_path):
    out_dir = tmp_path / "run"
    first = run("--out", out_dir, *TINY)
    assert first.returncode == 0, first.stderr
    assert "held-out exact-match accuracy: before" in first.stdout
    assert "finetune" in first.stderr  # the tqdm progress bar
    assert "held-out, before" in first.stderr and "held-out, after" in first.stderr  # the evaluations' bars
    for name in ["loss.csv", "loss.png", "samples.txt", "results.json", "checkpoint.pt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]:
        assert (out_dir / name).is_file(), name
    config = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["layers_to_transform"] == [28, 29]
    log = read_log(out_dir)
    assert [int(r["step"]) for r in log] == [1, 2]

    resumed = run("--out", out_dir, *TINY[2:], "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log2 = read_log(out_dir)
    assert [int(r["step"]) for r in log2] == [1, 2, 3]
    assert log2[:2] == log  # the first two steps come from the checkpoint, not from a rerun
    assert "accuracy before" not in resumed.stdout  # read back from results.json, not evaluated again
    results = json.loads((out_dir / "results.json").read_text())
    assert results["steps"] == 3 and 0 <= results["accuracy_after"] <= 1

    wrong = run("--out", out_dir, *TINY[2:], "--steps", "4", "--resume", "--rank", "4")
    assert wrong.returncode != 0 and "--rank" in wrong.stderr
