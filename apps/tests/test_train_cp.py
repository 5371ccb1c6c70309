"""apps/train.py --cp: windows split over a ring of 2 CPU ranks (ring attention) train exactly like one process."""
from pathlib import Path

import pytest

from train_helpers import losses, train

APPS = Path(__file__).parents[1]
# 31 tokens per window: 2N = 4 chunks do not divide it, so every window is padded on its way into the ring
SMALL = ["--steps", "4", "--ckpt-every", "4", "--sample-every", "4", "--seq-len", "31", "--batch-size", "4"]



def test_train_cp_two_ranks_equals_one_process(tmp_path):
    single = train(*SMALL, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    ring = train(*SMALL, "--cp", "2", "--out", str(tmp_path / "ring"), ranks=2)
    assert ring.returncode == 0, ring.stderr
    assert "[step 4] 'The fox" in ring.stdout  # sampling (no ring: the whole window on every rank) still works
    assert losses(tmp_path / "ring") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert losses(tmp_path / "one")[-1] < losses(tmp_path / "one")[0] - 0.3  # it learns


def test_train_cp_that_does_not_divide_the_ranks_is_one_clear_line(tmp_path):
    out = train(*SMALL, "--cp", "2", "--out", str(tmp_path / "x"))  # one process: no ring of 2
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: pp x cp x tp = 1 x 2 x 1 = 2 does not divide the world "
                                                    "size 1: the ranks are a grid, so pp * cp * tp must be one of [1]")
