"""Smoke test of apps/bench_startup.py: it runs as a user would run it, both loaders agree on the first token, and
it prints its table of phases."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_bench_startup_prints_the_phases_of_both_loaders():
    out = subprocess.run([sys.executable, APPS / "bench_startup.py", "--runs", "1"], capture_output=True, text=True,
                         timeout=300, cwd=APPS.parent)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"GGUF header", "tensors", "tokenizer", "**start to first token**", "peak RSS MB"} <= set(rows)
    assert "both give the first token" in out.stdout
