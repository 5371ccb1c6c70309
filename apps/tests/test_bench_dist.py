"""apps/bench_dist.py --layouts --quick: one row per layout, every measured number within 10% of the estimate.
(The DDP/FSDP table of bench_dist.py is tested in test_train.py.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def test_bench_dist_layouts_measure_next_to_the_estimate():
    out = subprocess.run([sys.executable, str(APPS / "bench_dist.py"), "--layouts", "--quick"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "MINLLAMA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = {line[:18].strip(): line[18:] for line in out.stdout.splitlines()
            if re.match(r"(FSDP|tp|pp|cp) \d", line)}
    assert list(rows) == ["FSDP 4", "tp 2 x FSDP 2", "pp 2 x FSDP 2", "cp 2 x FSDP 2", "tp 4 x FSDP 1"]
    for name, row in rows.items():
        ratios = [float(r) for r in re.findall(r"\((\d+\.\d+)\)", row)]
        assert len(ratios) == 3, row  # held, activations, sent
        assert all(0.9 <= r <= 1.1 for r in ratios), (name, row)


def test_the_default_layout_model_is_valid_for_every_layout():
    """The full-size run is not a test (it takes half a minute), but its model must build and split 4 ways: it once
    asked for 6 heads over 4 kv heads and crashed before measuring anything."""
    sys.path.insert(0, str(APPS))
    import bench_dist

    for dim, quick in ((384, False), (64, True), (512, False), (1024, False)):
        cfg = bench_dist.layout_config(type("Args", (), dict(quick=quick, dim=dim, vocab=4096, layers=12, seq=256)))
        assert cfg.n_kv_heads == 4 and cfg.n_heads % 4 == 0 and cfg.dim % cfg.n_heads == 0
