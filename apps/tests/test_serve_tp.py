"""`torchrun --nproc-per-node 2 apps/serve.py --tp 2` through the real `openai` client: the same answers, token for
token, as a one-process server on the same checkpoint (a tiny model with a byte tokenizer, written here: SmolLM2's
9 heads do not split over 2), concurrent and streamed; it shuts down leaving no process behind; a --tp that the
process count does not match is one clear error."""
import concurrent.futures as futures
import os
import signal
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

from test_serve import APPS, free_port, get

openai = pytest.importorskip("openai")
ENV = {**os.environ, "MINLLAMA_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
PROMPTS = ["Once upon a time", "The fox", "A", "In the middle of the night, the old owl"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from minllama.core import LlamaConfig, MinimalLlama, save_hf
    from minllama.core.tokenizer import B2U, GPT2_PATTERN, ByteLevelBPETokenizer

    torch.manual_seed(0)
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa"))  # 4 heads, 2 kv heads: split over 2 ranks
    model.init_weights()
    bytes_only = ByteLevelBPETokenizer({B2U[b]: b for b in range(256)}, [], {}, [GPT2_PATTERN])
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_hf(model, path, tokenizer=bytes_only)
    return str(path)


def start(checkpoint, *launcher, tp=1):
    port = free_port()
    proc = subprocess.Popen([sys.executable, *launcher, str(APPS / "serve.py"), "--checkpoint", checkpoint,
                             "--port", str(port), "--kv-memory", "4", "--dtype", "float32", "--tp", str(tp), "--model-name", "x"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            get(base + "/health")
            return proc, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def answers(client) -> list:
    def one(prompt):
        r = client.completions.create(model="x", prompt=prompt, max_tokens=24, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens
    with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: they share decode steps
        out = list(pool.map(one, PROMPTS))
    stream = client.completions.create(model="x", prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
    out.append("".join(c.choices[0].text for c in stream if c.choices))
    sampled = client.completions.create(model="x", prompt=PROMPTS[1], max_tokens=24, temperature=1.0, seed=7)
    return out + [sampled.choices[0].text]


@pytest.mark.slow
def test_tensor_parallel_server_answers_as_one_process(checkpoint):
    one, client = start(checkpoint)
    try:
        expected = answers(client)
    finally:
        one.terminate()
        one.wait(timeout=30)
    tp, client = start(checkpoint, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", tp=2)
    try:
        assert answers(client) == expected
        assert all(n == 24 for _, n in expected[:4])
    finally:
        if tp.poll() is None:
            os.killpg(tp.pid, signal.SIGTERM)  # as a Ctrl-C in its terminal would: every process of the group
        tp.wait(timeout=60)
    stderr = tp.stderr.read()
    left = subprocess.run(["pgrep", "-g", str(tp.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left behind: {left}\n{stderr}"
    assert "tensor parallel over 2 ranks" in stderr, stderr
    assert "error:" not in stderr and 'serve.py", line' not in stderr, stderr  # (torchrun reports its SIGTERM)


def test_tp_without_its_processes_is_one_clear_error(checkpoint):
    out = subprocess.run([sys.executable, str(APPS / "serve.py"), "--checkpoint", checkpoint, "--tp", "2"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["error: --tp 2 needs 2 processes, started with 1: run `uv run torchrun "
                                               "--nproc-per-node 2 apps/serve.py --tp 2`"]
