"""apps/chat.py's controls on a tiny checkpoint the tests write (fast, and its answers are known): Ctrl-C during an
answer, the repetition penalty (against transformers' own), the speed line of --streaming, and the help text."""
import ctypes
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minllama.core.chat_format import chat_format_for
from minllama.core.checkpoint import save_hf
from minllama.core.config import LlamaConfig
from minllama.core.generate import stream_text
from minllama.core.model import MinimalLlama
from minllama.core.tokenizer import B2U, GPT2_PATTERN, ByteLevelBPETokenizer

APPS = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("chat_app", APPS / "chat.py")
chat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chat)

IM_START, IM_END = 256, 257


def byte_tokenizer() -> ByteLevelBPETokenizer:
    """Bytes (no merges) and ChatML's two special tokens: chat.py finds the ChatML format and stops at <|im_end|>."""
    return ByteLevelBPETokenizer({B2U[b]: b for b in range(256)}, [], {"<|im_start|>": IM_START,
                                                                       "<|im_end|>": IM_END},
                                 [GPT2_PATTERN], eos_id=IM_END)


def x_model(max_seq_len: int = 8192) -> MinimalLlama:
    """A model that answers "xxxx..." forever, whatever it is told: every weight zero but the embeddings (all ones),
    the norms (ones) and the head's row for "x". The blocks add nothing to the residual stream, so the last hidden
    state is all ones and "x" is the one token with a positive logit. Tiny: thousands of tokens per second."""
    cfg = LlamaConfig.from_name("tiny-gqa", vocab_size=258, max_seq_len=max_seq_len)
    model = MinimalLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name == "tok_embeddings.weight" or name.endswith("norm.weight") else 0.0)
        model.output.weight[ord("x")] = 1.0
    return model.eval()


def prompt_length(messages) -> int:
    """What chat.py feeds for this dialog: ChatML (the tokenizer has no template: SmolLM2's default system prompt)."""
    tokenizer = byte_tokenizer()
    return len(chat_format_for(tokenizer).encode_dialog(tokenizer, messages))


@pytest.fixture(scope="module")
def x_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("x_model") / "hf"
    save_hf(x_model(), path, byte_tokenizer())
    return path


class Chat:
    """apps/chat.py in a subprocess, its stdout and stderr read as they come (threads, so neither pipe fills)."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, str(APPS / "chat.py"), *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=APPS.parent,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job may ignore SIGINT
        self.out, self.err = bytearray(), bytearray()
        for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._drain, args=(pipe, buf), daemon=True).start()

    @staticmethod
    def _drain(pipe, buf):
        while chunk := os.read(pipe.fileno(), 4096):
            buf += chunk

    def wait_for(self, what, timeout=120.0):
        """Wait until ``what()`` holds; fail with both streams if the chat exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None or what(), f"chat exited ({self.proc.returncode}): {self.text()}"
            assert time.monotonic() < deadline, f"timed out: {self.text()}"
            time.sleep(0.01)

    def send(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def text(self) -> str:
        return f"\nstdout: {bytes(self.out[-2000:])!r}\nstderr: {bytes(self.err[-2000:]).decode(errors='replace')}"


def test_ctrl_c_stops_the_answer_keeps_the_conversation_and_ctrl_c_at_the_prompt_leaves(x_checkpoint):
    chat_proc = Chat("--checkpoint", x_checkpoint, "--temperature", "0", "--max-new-tokens", "8000")
    try:
        chat_proc.wait_for(lambda: chat_proc.out.endswith(b"\n> "))
        chat_proc.send("hello")
        chat_proc.wait_for(lambda: b"xxxx" in chat_proc.out)  # the answer is coming
        chat_proc.proc.send_signal(signal.SIGINT)
        chat_proc.wait_for(lambda: b"tok/s" in chat_proc.err and chat_proc.out.endswith(b"\n> "))  # the prompt
        first_answer = chat_proc.out.split(b"\n> ")[1]
        assert b"stopped" in chat_proc.err and 4 <= len(first_answer) < 7000, chat_proc.text()
        assert first_answer == b"x" * len(first_answer)

        chat_proc.send("and again")
        chat_proc.wait_for(lambda: b"xxxx" in chat_proc.out.split(b"\n> ")[2])  # it answers again
        chat_proc.proc.send_signal(signal.SIGINT)
        chat_proc.wait_for(lambda: chat_proc.err.count(b"tok/s") == 2 and chat_proc.out.endswith(b"\n> "))
        assert chat_proc.err.count(b"stopped") == 2

        # the partial answer stayed in the conversation as the assistant's turn: the second prompt is exactly that,
        # and the kept cache fed only its new tokens (the last "x", never fed, then the end of turn and the question)
        dialog = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_answer.decode()},
                  {"role": "user", "content": "and again"}]
        all1, all2 = prompt_length(dialog[:1]), prompt_length(dialog)
        fed = re.findall(rb"prompt (\d+) new tokens \(of (\d+)\)", bytes(chat_proc.err))
        assert [(int(a), int(b)) for a, b in fed] == [(all1, all1), (all2 - all1 - len(first_answer) + 1, all2)], \
            chat_proc.text()

        chat_proc.proc.send_signal(signal.SIGINT)  # at the prompt: leave
        assert chat_proc.proc.wait(timeout=60) == 0, chat_proc.text()
        assert b"Traceback" not in chat_proc.err, chat_proc.text()
    finally:
        chat_proc.proc.kill()
        chat_proc.proc.wait()


def test_ctrl_c_stops_a_streaming_answer_and_the_session_goes_on(x_checkpoint):
    """--streaming keeps one rolling cache for the conversation: stopped mid-answer, it must stay consistent, and
    its speed line counts only the new tokens of each prompt (the rest is already in its cache)."""
    chat_proc = Chat("--checkpoint", x_checkpoint, "--temperature", "0", "--max-new-tokens", "8000", "--streaming")
    try:
        chat_proc.wait_for(lambda: chat_proc.out.endswith(b"\n> "))
        chat_proc.send("hello")
        chat_proc.wait_for(lambda: b"xxxx" in chat_proc.out)
        chat_proc.proc.send_signal(signal.SIGINT)
        chat_proc.wait_for(lambda: b"tok/s" in chat_proc.err and chat_proc.out.endswith(b"\n> "))
        first_answer = chat_proc.out.split(b"\n> ")[1].decode()
        chat_proc.send("hi")
        chat_proc.wait_for(lambda: b"xxxx" in chat_proc.out.split(b"\n> ")[2])
        chat_proc.proc.send_signal(signal.SIGINT)
        chat_proc.wait_for(lambda: chat_proc.err.count(b"tok/s") == 2 and chat_proc.out.endswith(b"\n> "))
        chat_proc.proc.stdin.close()  # Ctrl-D
        assert chat_proc.proc.wait(timeout=60) == 0, chat_proc.text()
        dialog = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_answer},
                  {"role": "user", "content": "hi"}]
        all1, all2 = prompt_length(dialog[:1]), prompt_length(dialog)
        # the first turn is all new; the second feeds the last "x" of the first answer (generated, so never fed),
        # then "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 24 tokens of this tokenizer
        assert re.findall(rb"prompt (\d+) new tokens \(of (\d+)\)", bytes(chat_proc.err)) == [
            (b"%d" % all1, b"%d" % all1), (b"24", b"%d" % all2)], chat_proc.text()
        assert all2 == all1 + len(first_answer) + 23
    finally:
        chat_proc.proc.kill()
        chat_proc.proc.wait()


def test_repetition_penalty_is_transformers_definition():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4  # both signs
    context = torch.randint(0, 50, (3, 12))
    for penalty in (0.7, 1.0, 1.3, 2.0):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(context, logits.clone())
        seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, context, True)
        assert torch.equal(chat.penalize_repetition(logits, seen, penalty), theirs)


def test_repetition_penalty_in_the_decode_loop_equals_transformers_step_by_step():
    """The hook penalizes what core's decode loop samples from: greedy decoding through the KV cache gives, token by
    token, what a full forward over the whole context plus transformers' processor picks."""
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    model = MinimalLlama(LlamaConfig.from_name("tiny-gqa"))
    model.init_weights()
    model.eval()
    prompt, penalty = [5, 17, 17, 40, 99], 1.8
    with torch.no_grad():
        ids, plain = list(prompt), list(prompt)
        for _ in range(30):
            context = torch.tensor([ids])
            ids.append(int(RepetitionPenaltyLogitsProcessor(penalty)(context, model(context)[:, -1]).argmax()))
            plain.append(int(model(torch.tensor([plain]))[0, -1].argmax()))
    hooked = chat.RepetitionPenalty(model, penalty)
    hooked.start(prompt)

    ours = []
    "".join(stream_text(model, byte_tokenizer(), prompt, 30, on_token=ours.append))
    assert ours == ids[len(prompt):]
    assert ours != plain[len(prompt):]  # the penalty changed the answer (this model repeats itself without it)
    hooked.handle.remove()


def test_help_states_the_defaults_once():
    out = subprocess.run([sys.executable, str(APPS / "chat.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    help_text = " ".join(out.stdout.split())
    assert "(default: the model family's own)" in help_text and "(default: None)" not in help_text
    assert "(default: 320)" in help_text and "(default: 1.0)" in help_text  # --max-new-tokens, --repetition-penalty
    assert "--threads" in help_text and "compiles (roughly 60 s" in help_text


def test_kv_cache_auto_is_bf16_only_where_the_cpp_step_reads_a_quantized_models_cache():
    auto = chat.parse_args(["--quantize", "int4"])
    assert chat.kv_cache_dtype(auto, cpu_decode=True) == torch.bfloat16
    assert chat.kv_cache_dtype(auto, cpu_decode=False) is None  # core's attention would convert it every step
    assert chat.kv_cache_dtype(chat.parse_args([]), cpu_decode=True) is None  # float models: their own dtype
    assert chat.kv_cache_dtype(chat.parse_args(["--kv-cache", "float32", "--quantize", "int8"]), True) == torch.float32
    assert chat.kv_cache_dtype(chat.parse_args(["--kv-cache", "bfloat16"]), False) == torch.bfloat16


def test_chat_and_serve_turn_off_mkls_buffer_pool_before_torch_starts():
    """MKL reads MKL_DISABLE_FAST_MM once, as torch starts: chat.py and serve.py set it above their torch import, and
    then an fp32 GEMM leaves nothing held behind (with the pool, MBs: core's test_memory.py)."""
    probe = """
import ctypes, importlib.util, os, sys
os.environ.pop("MKL_DISABLE_FAST_MM", None)
spec = importlib.util.spec_from_file_location("app", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # imports torch
import torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks uordblks".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
x, w = torch.randn(512, 576), torch.randn(1536, 576)
before = libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd
torch.nn.functional.linear(x, w)  # its output freed at once: only what MKL keeps stays
print(os.environ["MKL_DISABLE_FAST_MM"], (libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd - before) / 2**20)
"""
    if not hasattr(ctypes.CDLL(None), "mallinfo2") or not torch.backends.mkl.is_available():
        pytest.skip("needs glibc >= 2.33 (mallinfo2) and a torch with MKL")
    for app in ("chat.py", "serve.py"):
        run = subprocess.run([sys.executable, "-c", probe, str(APPS / app)], capture_output=True, text=True,
                             timeout=120, cwd=APPS)
        assert run.returncode == 0, run.stderr
        setting, held_mb = run.stdout.split()
        assert setting == "1" and float(held_mb) < 0.5, (app, run.stdout)
