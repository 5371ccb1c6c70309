"""The tutorial is executable: every ```python block of the package README runs, in order, in one namespace."""
from pathlib import Path

from minllama.core.tutorial import python_blocks, run_python_blocks

README = Path(__file__).parents[1] / "README.md"


def test_readme_snippets_run():
    assert len(python_blocks(README)) >= 9
    run_python_blocks(README)
