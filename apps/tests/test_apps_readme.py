"""apps/README.md is executable: every ```python block runs, in order, in one namespace, from the repository root
(the guide imports the apps from apps/ as a reader would)."""
from pathlib import Path

import torch

from minllama.core.tutorial import python_blocks, run_python_blocks

README = Path(__file__).parents[1] / "README.md"


def test_apps_readme_snippets_run(monkeypatch):
    assert len(python_blocks(README)) >= 4
    monkeypatch.chdir(README.parents[1])
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the guide's sys.path.insert stays local
    threads = torch.get_num_threads()
    try:
        run_python_blocks(README)
    finally:
        torch.set_num_threads(threads)
