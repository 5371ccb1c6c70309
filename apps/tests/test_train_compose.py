"""apps/train.py with two of its splits composed, on 4 CPU ranks, against one process on the same data:
--pp 2 --tp 2 (each pipeline stage tensor parallel), --cp 2 --tp 2 (rings of 2, each rank tensor parallel over its
ring share) and --pp 2 --cp 2 (each pipeline stage a ring of 2)."""

import pytest

from train_helpers import losses, train

SMALL = ["--steps", "4", "--ckpt-every", "4", "--sample-every", "0", "--seq-len", "32", "--batch-size", "4"]
# another layout sums in another order: 1e-7 at first, and AdamW makes more of it (see test_train_pp.py)
LAYOUT_TOLERANCE = 1e-5



@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    single = train(*SMALL, "--out", str(out))
    assert single.returncode == 0, single.stderr
    return losses(out)


SPLITS = {  # the options, and the mesh train.py reports
    "pp2xtp2": (["--pp", "2", "--tp", "2", "--microbatches", "2"], "pp=2 x dp_shard=1 x cp=1 x tp=2"),
    "cp2xtp2": (["--cp", "2", "--tp", "2"], "pp=1 x dp_shard=1 x cp=2 x tp=2"),
    "pp2xcp2": (["--pp", "2", "--cp", "2", "--microbatches", "2"], "pp=2 x dp_shard=1 x cp=2 x tp=1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("split", list(SPLITS))
def test_train_composed_splits_equal_one_process(tmp_path, one_process, split):
    options, layout = SPLITS[split]
    run = train(*SMALL, *options, "--out", str(tmp_path / "run"), ranks=4)
    assert run.returncode == 0, run.stderr
    assert layout in run.stderr, run.stderr
    assert losses(tmp_path / "run") == pytest.approx(one_process, abs=LAYOUT_TOLERANCE)
