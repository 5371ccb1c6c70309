"""apps/bench_kernels.py runs as a user would run it: a clean exit without a GPU, and a smoke run of every code path
on tiny shapes under the interpreter (its timings mean nothing; that it runs end to end does)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "bench_kernels.py"


def run(*args, **env):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would benchmark")
def test_bench_without_gpu_says_so_and_exits_0():
    out = run(TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "needs a CUDA GPU" in out.stdout


def test_bench_smoke_runs_every_kernel_and_the_training_step():
    """As the docstring says to run it, without TRITON_INTERPRET: on a CPU the script sets it and starts again."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, SCRIPT, "--smoke"], capture_output=True, text=True, timeout=600,
                         env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "Triton's CPU interpreter (TRITON_INTERPRET=1)" in out.stderr
    for op in ("rmsnorm+residual", "rope q+k", "swiglu", "linear+cross-entropy"):
        assert f"{op}" in out.stdout and out.stdout.count(op) == 2  # eager and triton rows
    assert "kernels" in out.stdout.split("training step")[1]
