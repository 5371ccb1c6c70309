"""What a user sees first: a module run by mistake says what it is, and benchmarks print no library warnings."""
import subprocess
import sys
from pathlib import Path

APPS = Path(__file__).parents[1]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=APPS.parent)


def test_lr_schedule_run_as_a_program_says_what_it_is():
    for argv in ([], ["--help"]):
        out = run(APPS / "lr_schedule.py", *argv)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("The learning-rate schedule") and "from lr_schedule import lr_at" in out.stdout
        assert "step 399: 2.00e-04" in out.stdout  # 10% of the 2e-3 peak at the end


def test_bench_peft_prints_no_deprecation_warning_of_transformers():
    out = run(APPS / "bench_peft.py", "--batch", "1", "--seq-len", "8", "--steps", "1", "--only", "HF peft LoRA",
              timeout=600)
    assert out.returncode == 0, out.stderr
    assert "HF peft LoRA" in out.stdout
    assert "Warning" not in out.stderr and "deprecated" not in out.stderr, out.stderr
