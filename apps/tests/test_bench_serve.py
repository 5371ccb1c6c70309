"""apps/bench_serve.py runs end to end (a smoke run: tiny counts; it is a benchmark, so nothing is timed here)."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_bench_serve_quick_prints_both_tables():
    out = subprocess.run([sys.executable, APPS / "bench_serve.py", "--quick", "--concurrency", "2"],
                         capture_output=True, text=True, timeout=900, cwd=APPS.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| engine | 2 |" in out.stdout and "| static batching (generate) | 2 |" in out.stdout
    assert "| transformers generate (static, padded) | 2 |" in out.stdout
    lookup = next(line for line in out.stdout.splitlines() if line.startswith("| prompt lookup, k=4 |"))
    assert lookup.endswith("| yes |"), lookup  # fp32: speculative greedy output equals plain greedy decoding
