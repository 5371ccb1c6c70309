"""apps/bench_gemv.py runs as a user would run it (a smoke run: its timings mean nothing here, that every column
runs and decodes the same greedy tokens in fp32 does)."""
import subprocess
import sys
from pathlib import Path

import pytest

from minllama.kernels.cpu_gemv import cpu_gemv_supported

SCRIPT = Path(__file__).parents[1] / "bench_gemv.py"


@pytest.mark.skipif(cpu_gemv_supported() is not None, reason=f"CPU kernels unavailable: {cpu_gemv_supported()}")
def test_bench_gemv_compares_three_ways_to_decode():
    out = subprocess.run([sys.executable, SCRIPT, "--runs", "1", "--new-tokens", "8"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"float32", "bfloat16"} <= rows.keys(), out.stdout
    assert rows["float32"].count("(True)") == 2, rows["float32"]  # fp32: the same tokens all three ways
