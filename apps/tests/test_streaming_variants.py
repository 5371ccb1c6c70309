"""`--streaming` (extend's rolling SinkKVCache) with a swapped attention: the Triton kernels and differential
attention. The rolling cache is only a cache, so each variant must stream exactly what it computes itself on the
tokens the cache keeps (the sinks, then the window), and the chat session must work over it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

APPS = Path(__file__).parents[1]
sys.path.insert(0, str(APPS))

import modified_attention as ma  # noqa: E402
from minllama.core.config import LlamaConfig  # noqa: E402
from minllama.core.generate import stream_text  # noqa: E402
from minllama.extend.streaming import StreamingChat  # noqa: E402

# One layer: a cached key/value depends on its own token only, so once the window rolls, streaming must equal a fresh
# forward over exactly the kept tokens. q/k are scaled up so that attention is peaked and position-sensitive.
ROLLING_CHECK = """
def rolling_check(model, n_sink=4, window=24, steps=90):
    import torch
    from minllama.extend.streaming import SinkKVCache, streaming_forward
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(4.0)
            layer.attention.wk.weight.mul_(4.0)
    ids = torch.randint(0, 256, (1, steps), generator=torch.Generator().manual_seed(1))
    cache, worst, checked = SinkKVCache(model, n_sink, window), 0.0, 0
    with torch.no_grad():
        for t in range(steps):
            logits = streaming_forward(model, cache, ids[:, t:t + 1])[:, -1]
            if t >= n_sink + window and t % 7 == 0:
                kept = torch.cat([ids[:, :n_sink], ids[:, t + 1 - window:t + 1]], dim=1)
                worst = max(worst, float((logits - model(kept)[:, -1]).abs().max()))
                checked += 1
    assert cache.n_evicted == steps - n_sink - window and checked >= 5
    return worst
"""
exec(ROLLING_CHECK)


def diff_model(n_layers=1) -> ma.DiffLlama:
    model = ma.DiffLlama(LlamaConfig.from_name("tiny-gqa", n_layers=n_layers))
    torch.manual_seed(0)
    model.init_weights()
    return model.eval()


def test_differential_attention_streams_what_it_computes_on_the_kept_window():
    assert rolling_check(diff_model()) < 1e-5  # noqa: F821  (defined by exec above)


def test_streaming_chat_with_differential_attention_equals_plain_chat_before_the_window_fills():
    from minllama.core.tokenizer import B2U, GPT2_PATTERN, ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer({B2U[b]: b for b in range(256)}, [], {}, [GPT2_PATTERN])  # bytes, no merges
    model = diff_model(n_layers=2)
    chat = StreamingChat(model, n_sink=4, window=100)
    prompt = tok.encode("hello there")
    ours = "".join(chat.stream_text(tok, prompt, 12))
    assert ours == "".join(stream_text(model, tok, prompt, 12)) and len(ours) > 0
    assert chat.cache.length == len(chat.history) == len(prompt) + 11


def test_triton_kernels_stream_what_they_compute_on_the_kept_window():
    """In a subprocess: Triton reads TRITON_INTERPRET (the CPU's interpreter) when minllama.kernels is imported."""
    script = ROLLING_CHECK + textwrap.dedent("""
        import torch
        from minllama.core.config import LlamaConfig
        from minllama.core.model import MinimalLlama
        import minllama.kernels as K
        import minllama.kernels.swap as swap

        torch.manual_seed(0)
        model = MinimalLlama(LlamaConfig.from_name("tiny-gqa", n_layers=1))
        model.init_weights()
        model.eval()
        K.apply(model)
        assert K.is_applied(model), "the kernels were not applied: is Triton usable here?"
        calls = []
        kernel = swap.decode_attention
        swap.decode_attention = lambda *a: calls.append(1) or kernel(*a)
        worst = rolling_check(model)
        assert len(calls) > 50, f"the decode kernel ran {len(calls)} times"
        print("worst", worst)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("worst")[-1]) < 1e-4
