"""Smoke test of apps/extend_vocab.py, run as a user would run it (loads the embedded SmolLM2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).parents[1]


@pytest.mark.slow
def test_extend_vocab_quick_run_keeps_old_logits_and_reloads(tmp_path):
    out = subprocess.run([sys.executable, APPS / "extend_vocab.py", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=APPS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["new_tokens"] == 16 and results["old_logits_bit_identical"] and results["reloaded"]
    assert results["held_out_tokens_after"] <= results["held_out_tokens_before"]
    assert (tmp_path / "extended" / "tokenizer.json").is_file()
    assert "learning 16 new tokens" in out.stdout and "finetuning the new rows" in out.stderr  # the long phases
