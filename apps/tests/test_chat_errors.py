"""apps/chat.py on bad input: one `error: ...` line on stderr and status 2, never a traceback. Errors in the options
are found before the model loads (checked in-process with a loader that must not be called, then once per kind as a
user runs the app); a prompt longer than the context needs the model, in one subprocess."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

APPS = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("chat_app", APPS / "chat.py")
chat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat)

NO_SUCH_GPU = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: cuda:0 on a machine without one
BAD = [
    *[["--temperature", v] for v in ("nan", "inf", "-inf", "-0.1", "warm")],
    *[["--top-p", v] for v in ("0", "-0.5", "1.01", "nan", "inf")],
    *[["--top-k", v] for v in ("-1", "2.5")],
    *[["--max-new-tokens", v] for v in ("-1", "0", "1.5", "nan")],
    *[["--seed", v] for v in ("-1", str(2**64), "x")],
    ["--device", "foo"], ["--device", "cuda:x"], ["--device", NO_SUCH_GPU], ["--device", "meta"],
    ["--device", "hpu"], ["--dtype", "int3"], ["--quantize", "int2"], ["--kv-cache", "int8"], ["--no-such-option"],
    ["--prompt", "caf\udce9"], ["--system", "\udcff\udcfe"],  # bytes 0xE9, 0xFF 0xFE in argv: not UTF-8
]


def one_error_line(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("argv", BAD, ids=" ".join)
def test_bad_option_is_one_line_and_status_2_before_loading(argv, monkeypatch, capsys):
    monkeypatch.setattr(chat, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    try:
        status = chat.main(["--prompt", "hi", *argv])
    except SystemExit as e:  # argparse's errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    one_error_line(err, argv[0] if argv[0] != "--no-such-option" else "unrecognized")


def run(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(APPS / "chat.py"), *args], input=stdin, capture_output=True,
                         timeout=300, cwd=APPS.parent)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                       out.stderr.decode(errors="replace"))


@pytest.mark.parametrize("argv, words", [
    (["--temperature", "nan"], ["--temperature", "finite"]),
    (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens", ">= 1"]),
    (["--device", "foo"], ["unknown --device 'foo'"]),
    (["--device", NO_SUCH_GPU], [f"--device {NO_SUCH_GPU}", "cuda"]),
    ([b"--prompt", b"caf\xe9 au lait"], ["--prompt", "not valid UTF-8", "0xE9"]),
], ids=["temperature", "top-p", "max-new-tokens", "device", "gpu", "utf-8"])
def test_bad_option_as_a_user_runs_it(argv, words):
    out = run("--prompt", "hi", *argv)
    assert out.returncode == 2 and out.stdout == ""
    one_error_line(out.stderr, *words)


def test_prompt_longer_than_the_context_is_one_line_and_status_2():
    out = run("--prompt", "hi " * 9000, "--max-new-tokens", "4")  # ~9000 tokens; SmolLM2's context is 8192
    assert out.returncode == 2 and out.stdout == ""
    one_error_line(out.stderr, "context is 8192")


def test_interactive_message_that_is_not_utf8_is_reported_and_the_chat_goes_on():
    out = run("--temperature", "0", "--max-new-tokens", "2", stdin=b"caf\xe9\n/quit\n")
    assert out.returncode == 0, out.stderr
    one_error_line(out.stderr, "the message is not valid UTF-8")
