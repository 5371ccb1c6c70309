"""Tests of apps/extend_vocab.py: its corpus handling (fast), and quick runs as a user would run them (load the
embedded SmolLM2)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("extend_vocab_app", APPS / "extend_vocab.py")
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)


def run(*args, timeout=900):
    return subprocess.run([sys.executable, APPS / "extend_vocab.py", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=APPS.parent)


def test_the_corpus_is_real_korean_split_by_dialogue():
    dialogues = app.corpus_dialogues("korean")
    assert len(dialogues) > 400 and len(set(dialogues)) == len(dialogues)
    hangul = sum("\uac00" <= ch <= "\ud7a3" for d in dialogues for ch in d)
    assert hangul > 0.5 * sum(len(d) - d.count(" ") for d in dialogues)  # mostly Hangul syllables
    train, held = app.split_held_out(dialogues)
    assert len(held) > 50 and not {ln for d in held for ln in d.splitlines()} & {ln for d in train
                                                                               for ln in d.splitlines()}


def test_eval_pieces_cut_at_line_ends_and_keep_every_character():
    text = "".join(f"line {i}: " + "x" * 50 + "\n" for i in range(30))
    pieces = app.eval_pieces([text, "short\n"], limit=100, max_chars=200)
    assert "".join(pieces) == text + "short\n" and all(len(p) <= 200 for p in pieces)
    assert all(p.endswith("\n") for p in pieces) and len(app.eval_pieces([text], limit=2)) == 2


def test_an_unknown_language_is_refused_with_the_known_ones():
    out = run("--language", "klingon", timeout=120)
    assert out.returncode == 2 and "no language 'klingon'" in out.stderr and "korean" in out.stderr


def test_a_language_with_too_little_text_is_refused():
    out = run("--language", "thai", timeout=120)  # one short file in chatterbot-corpus
    assert out.returncode == 2 and "too little to learn tokens from" in out.stderr


@pytest.mark.slow
def test_extend_vocab_quick_run_on_code_keeps_old_logits_and_reloads(tmp_path):
    out = run("--domain", "code", "--quick", "--out", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["new_tokens"] == 16 and results["old_logits_bit_identical"] and results["reloaded"]
    assert results["held_out_tokens_after"] <= results["held_out_tokens_before"]
    assert (tmp_path / "extended" / "tokenizer.json").is_file()
    assert "learning 16 new tokens" in out.stdout and "finetuning the new rows" in out.stderr  # the long phases


@pytest.mark.slow
def test_extend_vocab_quick_run_on_korean_measures_every_stage(tmp_path):
    out = run("--quick", "--out", tmp_path, "--plot", tmp_path / "fig.png")
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["old_logits_bit_identical"] and results["reloaded"] and results["text"] == "korean"
    rows = {(r["tokenizer"].split()[0], r["text"]): r for r in results["tokenizers"]}
    assert set(rows) == {("SmolLM2", "new"), ("SmolLM2", "English"), ("Llama-2-style", "new"),
                         ("Llama-2-style", "English")}
    assert rows["SmolLM2", "new"]["after"] < 0.95 * rows["SmolLM2", "new"]["before"]  # 16 tokens: measured 1.18x
    assert rows["Llama-2-style", "new"]["after"] < rows["Llama-2-style", "new"]["before"] / 2  # measured 3.4x
    assert all(rows[t, "English"]["after"] <= rows[t, "English"]["before"] for t in ("SmolLM2", "Llama-2-style"))
    stages = results["bits_per_char"]  # base, new tokens, + new rows, + LoRA, and the control
    assert len(stages) == 5 and list(stages)[-1].startswith("control") and all(0 < v < 20 for v in stages.values())
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "adapter").is_dir()
    assert "LoRA finetune" in out.stderr and "tokens per character, held out" in out.stdout
