"""Executable tutorials: each package's tests run the ```python blocks of its README, so what a reader sees is what
the code does. Blocks run in order in one namespace, like notebook cells; ```text and ```bash blocks never run."""
from __future__ import annotations

import re
from pathlib import Path


def python_blocks(path: str | Path) -> list[str]:
    """The source of every ```python fenced block of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", Path(path).read_text(), flags=re.S | re.M)


def run_python_blocks(path: str | Path) -> dict:
    """Execute the blocks one after the other; a failure names the file and the block. Returns the namespace."""
    path, namespace = Path(path), {}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.name} block {i + 1}", "exec"), namespace)
    return namespace
