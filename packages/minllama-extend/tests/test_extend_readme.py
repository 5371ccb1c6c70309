"""The tutorial is executable: every ```python block of the package README runs, in order, in one namespace."""
import re
from pathlib import Path

from minllama.core.tutorial import python_blocks, run_python_blocks

README = Path(__file__).parents[1] / "README.md"


def test_readme_snippets_run():
    assert len(python_blocks(README)) >= 6
    run_python_blocks(README)


def test_readme_figures_exist():
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text()):
        assert (README.parent / image).is_file(), image
