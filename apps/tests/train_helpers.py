"""Running apps/train.py as a user would (one process, or N under torchrun) and reading its loss log: shared by
the train tests of every layout."""
import os
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]
ENV = {**os.environ, "MINLLAMA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def train(*args, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return subprocess.run([sys.executable, *launcher, str(APPS / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=APPS.parent, env=ENV)


def losses(out: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
