"""The tutorial is executable: every ```python block of the package README runs, in order, in one namespace, in a
process group of one rank (gloo, CPU)."""
import os
from pathlib import Path

import torch.distributed as dist

from minllama.core.tutorial import python_blocks, run_python_blocks

README = Path(__file__).parents[1] / "README.md"


def test_dist_readme_snippets_run():
    assert len(python_blocks(README)) >= 8
    saved_env = dict(os.environ)
    try:
        run_python_blocks(README)
        assert not dist.is_initialized()  # the last block left the group
    finally:
        if dist.is_initialized():  # never leak a process group into the tests that fork ranks
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
