"""Smoke test of apps/long_context_eval.py, run as a user would run it (loads the embedded SmolLM2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).parents[1]


@pytest.mark.slow
def test_long_context_eval_quick_run_writes_the_figure_and_results(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, APPS / "long_context_eval.py", "--quick", "--methods", "base", "yarn",
                          "dynamic", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         cwd=APPS.parent, env=env)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["perplexity"]) == {"base", "yarn", "dynamic"}
    # dynamic NTK changes nothing up to the original length (64 in --quick): same perplexity as the base model
    assert results["perplexity"]["dynamic"]["64"] == results["perplexity"]["base"]["64"]
    assert all(1 < p < 1000 for ppl in results["perplexity"].values() for p in ppl.values())
    assert {"sinks", "window only", "full cache"} <= set(results["streaming"])
    assert (tmp_path / "long_context_eval.png").stat().st_size > 10_000


def test_long_context_eval_bad_checkpoint_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, APPS / "long_context_eval.py", "--checkpoint", str(tmp_path / "x.gguf"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=APPS.parent)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: ")
