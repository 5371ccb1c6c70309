"""Smoke tests of apps/chat.py and apps/bench.py, run as a user would run them."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=APPS.parent)


def test_chat_answers_the_readme_question_with_paris():
    out = run(APPS / "chat.py", "--prompt", "What is the capital of France?", "--temperature", "0",
              "--max-new-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr


def test_chat_streaming_mode_gives_the_same_greedy_answer():
    """--streaming (attention sinks + rolling cache) equals plain decoding while the window is not full."""
    args = ["--prompt", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "24"]
    plain, streaming = run(APPS / "chat.py", *args), run(APPS / "chat.py", *args, "--streaming")
    assert streaming.returncode == 0, streaming.stderr
    assert streaming.stdout == plain.stdout and "Paris" in streaming.stdout


def test_chat_quantized_and_compiled_still_answers_paris():
    """A quantized model (--quantize int4: 4-bit layers, 8-bit head, minllama-quant) with a compiled decode step,
    the README's fast path, still answers correctly."""
    out = run(APPS / "chat.py", "--prompt", "What is the capital of France?", "--temperature", "0",
              "--max-new-tokens", "24", "--quantize", "int4", "--compile")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "tok/s" in out.stderr


def test_chat_keeps_the_conversation_and_understands_commands():
    stdin = "My name is Ada.\n/reset\nHello\n/quit\n"
    out = subprocess.run([sys.executable, APPS / "chat.py", "--temperature", "0", "--max-new-tokens", "12"],
                         input=stdin, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(conversation cleared)" in out.stdout
    assert out.stderr.count("tok/s") == 2  # two answers, the commands produce none


def test_chat_bad_checkpoint_is_one_clear_line_and_status_2(tmp_path):
    for source in [tmp_path / "missing.gguf", "no-such-model", tmp_path]:
        out = run(APPS / "chat.py", "--checkpoint", str(source), "--prompt", "hi")
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr


def test_chat_help_documents_every_option():
    out = run(APPS / "chat.py", "--help")
    for option in ["--prompt", "--checkpoint", "--temperature", "--top-k", "--top-p", "--max-new-tokens", "--seed",
                   "--device", "--dtype", "--compile", "--system", "--quantize"]:
        assert option in out.stdout


def test_bench_runs_and_compares():
    out = run(APPS / "bench.py", "--no-compile", "--prompt-len", "16", "--new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert "failed" not in out.stdout, out.stdout
    assert "as fast as transformers" in out.stdout
