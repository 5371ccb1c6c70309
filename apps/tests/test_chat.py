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


def test_chat_quantized_on_the_cpp_step_with_its_bf16_cache_answers_paris():
    """--quantize int8 without --compile: the C++ decode step where the CPU has AVX-512 (core's layers elsewhere),
    with --kv-cache auto's bf16 keys and values there, and --kv-cache float32 gives the same greedy answer."""
    args = [APPS / "chat.py", "--prompt", "What is the capital of France?", "--temperature", "0",
            "--max-new-tokens", "24", "--quantize", "int8"]
    auto, full = run(*args), run(*args, "--kv-cache", "float32")
    assert auto.returncode == 0 and full.returncode == 0, auto.stderr + full.stderr
    assert "Paris" in auto.stdout and auto.stdout == full.stdout


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
                   "--device", "--dtype", "--compile", "--system", "--quantize", "--kv-cache"]:
        assert option in out.stdout


def test_bench_runs_and_compares():
    out = run(APPS / "bench.py", "--no-compile", "--runs", "1", "--prompt-len", "16", "--new-tokens", "4",
              "--cost-tokens", "64", "--dtypes", "float32,bfloat16,int4,q4_1")
    assert out.returncode == 0, out.stderr
    assert "failed" not in out.stdout, out.stdout
    assert "eager q4_1" in out.stdout and "eager int4" in out.stdout, out.stdout  # the quantized formats load
    assert "as fast as transformers" in out.stdout and "one run each" in out.stdout
    assert "eager bf16" in out.stdout and "in bf16 decodes" in out.stdout  # both dtypes, side by side
    cost = next(line for line in out.stdout.splitlines() if line.startswith("bf16's accuracy cost on 64 tokens"))
    fp32_ppl = float(cost.split(" vs ")[1].split()[0])
    assert 1 < fp32_ppl < 100, cost  # SmolLM2 on English prose: a language model's perplexity, not garbage


def test_bench_compares_each_sides_best_run_and_says_when_the_machine_was_busy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_app", APPS / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ours = [{"decode_tok_s": 20.0, "prefill_tok_s": 500.0}, {"error": "killed"}, {"decode_tok_s": 30.0,
                                                                                "prefill_tok_s": 400.0}]
    theirs = [{"decode_tok_s": 10.0, "prefill_tok_s": 250.0}, {"decode_tok_s": 25.0, "prefill_tok_s": 200.0},
              {"decode_tok_s": 24.0, "prefill_tok_s": 100.0}]
    line = bench.conclusion({("minllama", "eager"): ours, ("transformers", "eager"): theirs}, "eager")
    # best decode 30 / 25, best prefill 500 / 250; per-run ratios 2.0 and 1.25 (the failed run is left out)
    assert line.startswith("eager: MinimalLlama decodes 1.20x and prefills 2.00x as fast as transformers"), line
    assert "best of 3 runs each; decode ratio per run 1.25-2.00, median 1.62" in line
    assert bench.conclusion({("minllama", "eager"): ours}, "eager") is None  # nothing to compare with
    assert bench.busy_note([1.5, 1.9], cores=2) is None
    assert "looked busy (load average 1.5, 4.2 during the runs, on 2 cores)" in bench.busy_note([1.5, 4.2], 2)
