"""apps/README.md is executable: every ```python block runs, in order, in one namespace, from the repository root
(the guide imports the apps from apps/ as a reader would)."""
import os
import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_apps_readme_snippets_run(monkeypatch):
    blocks = python_blocks(README)
    assert len(blocks) >= 4
    monkeypatch.chdir(README.parents[1])
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the guide's sys.path.insert stays local
    threads = torch.get_num_threads()
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{README.name} block {i + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
