"""Smoke test of apps/bench_quant.py: it runs, as a user would run it, and prints its comparison table."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_bench_quant_prints_the_table():
    out = subprocess.run([sys.executable, APPS / "bench_quant.py", "--only", "fp32", "int8", "--no-ppl",
                          "--no-compile", "--prompt-len", "8", "--new-tokens", "3"],
                         capture_output=True, text=True, timeout=600, cwd=APPS.parent)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"fp32", "int8"} <= set(rows)
    assert "| 1.00x / nan" in rows["fp32"]  # fp32 is the reference; no compiled column with --no-compile
    assert " 129 |" in rows["int8"]  # the int8 model's stored MiB (513 for fp32)
