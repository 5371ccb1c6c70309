"""The tutorial is executable: every ```python block of the package README runs, in order, in one namespace, in a
process group of one rank (gloo, CPU)."""
import os
import re
from pathlib import Path

import torch.distributed as dist

README = Path(__file__).parents[1] / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_dist_readme_snippets_run():
    blocks = python_blocks(README)
    assert len(blocks) >= 8
    saved_env = dict(os.environ)
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{README.name} block {i + 1}", "exec"), namespace)
        assert not dist.is_initialized()  # the last block left the group
    finally:
        if dist.is_initialized():  # never leak a process group into the tests that fork ranks
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
