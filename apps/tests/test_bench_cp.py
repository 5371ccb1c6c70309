"""apps/bench_cp.py at a tiny size: it runs, prints one row per length, and a ring of 2 holds less per rank."""
import os
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_bench_cp_prints_memory_per_rank_against_one_process():
    out = subprocess.run([sys.executable, str(APPS / "bench_cp.py"), "--seqs", "128", "512", "--dim", "128",
                          "--layers", "2", "--vocab", "512"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MINLLAMA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "CP 2 ranks MiB (max rank)" in lines[1]
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in lines[2:]}
    assert sorted(rows) == [128, 512]
    single, ring, ratio = rows[512][:3]
    assert ring < single and ratio > 1.2  # half the tokens per rank: clearly less activation memory
