"""The tutorial is executable: every ```python block of the package README runs, in order, in one namespace."""
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_readme_snippets_run():
    blocks = python_blocks(README)
    assert len(blocks) >= 9
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{README.name} block {i + 1}", "exec"), namespace)
