"""apps/profile_decode.py runs and accounts for a decode step (a smoke run; nothing is timed here)."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_profile_decode_groups_the_step_by_kind():
    out = subprocess.run([sys.executable, APPS / "profile_decode.py", "--dtype", "float32", "--tokens", "3"],
                         capture_output=True, text=True, timeout=300, cwd=APPS.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for kind in ["matrix products (the weights)", "attention", "element-wise (norms, RoPE, SwiGLU, adds)"]:
        assert kind in rows, out.stdout
    shares = [float(line.split(" | ")[2].rstrip("%")) for line in rows.values() if line.split(" | ")[2].endswith("%")]
    assert 90 <= sum(shares) <= 110, out.stdout  # the kinds and the Python gap add up to the profiled step
    # SmolLM2 has 30 layers, each with 7 weight matrices, plus the head: at least 211 matrix products per token
    assert float(rows["matrix products (the weights)"].split(" | ")[3].rstrip(" |")) >= 211, out.stdout
