"""The engine chapter is executable: every ```python block of docs/engine.md runs, in order, in one namespace."""
from pathlib import Path

from minllama.core.tutorial import python_blocks, run_python_blocks

CHAPTER = Path(__file__).parents[1] / "docs" / "engine.md"


def test_engine_chapter_snippets_run():
    assert len(python_blocks(CHAPTER)) >= 5
    run_python_blocks(CHAPTER)
