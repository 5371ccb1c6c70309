"""Attention sinks + rolling KV cache: equal to plain decoding before the window fills, equal to a fresh pass over
(sinks + window) once it rolls (exact for a one-layer model, where cached keys depend on their token only), and
memory that does not grow over thousands of tokens."""
import pytest
import torch

from extend_helpers import smollm2_gguf, tiny_model
from minllama.core.cache import StaticKVCache
from minllama.core.generate import generate, stream_text
from minllama.extend.streaming import SinkKVCache, StreamingChat, streaming_forward, streaming_generate


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa", "tiny-mqa"])
def test_before_the_window_fills_it_equals_plain_cached_decoding(name):
    model = tiny_model(name, sharp=4.0)
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(0))
    cache = SinkKVCache(model, n_sink=4, window=60)
    ours = [streaming_forward(model, cache, ids[:, :20])]  # a prefill chunk, then one token at a time
    ours += [streaming_forward(model, cache, ids[:, t:t + 1]) for t in range(20, 50)]
    static = StaticKVCache(model, 1, 64)
    plain = [model(ids[:, :20], torch.arange(20), cache=static)]
    plain += [model(ids[:, t:t + 1], torch.tensor([t]), cache=static) for t in range(20, 50)]
    torch.testing.assert_close(torch.cat(ours, 1), torch.cat(plain, 1), rtol=1e-5, atol=1e-5)
    assert cache.n_evicted == 0 and cache.length == 50
    prompt = ids[0, :10].tolist()
    assert list(streaming_generate(model, prompt, 40, n_sink=4, window=60)) == generate(model, [prompt], 40)[0]


@torch.no_grad()
def test_once_rolling_positions_are_reassigned_within_the_cache():
    # One layer: a cached key/value depends on its token alone, so streaming must equal a fresh forward over
    # exactly the tokens still in the cache (sinks, then the window), at positions 0 .. n_sink + window - 1.
    model = tiny_model("tiny-gqa", sharp=4.0, n_layers=1)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    n_sink, window = 4, 40
    cache = SinkKVCache(model, n_sink, window)
    for t in range(200):
        logits = streaming_forward(model, cache, ids[:, t:t + 1])
        if t >= n_sink + window and t % 37 == 0:
            kept = torch.cat([ids[:, :n_sink], ids[:, t + 1 - window:t + 1]], dim=1)
            torch.testing.assert_close(logits[:, -1], model(kept)[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.n_evicted == 200 - n_sink - window
    # without the sink slots the rolled cache is a plain sliding window: a different (worse) model
    no_sink = SinkKVCache(model, 0, window)
    for t in range(200):
        other = streaming_forward(model, no_sink, ids[:, t:t + 1])
    torch.testing.assert_close(other[:, -1], model(ids[:, 200 - window:])[:, -1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_memory_stays_bounded_over_thousands_of_tokens():
    model = tiny_model("tiny-gqa")
    cache = SinkKVCache(model, n_sink=4, window=60)
    buffers = [(t.data_ptr(), t.shape) for t in (*cache.k, *cache.v)]
    nbytes = cache.nbytes()
    tokens = list(streaming_generate(model, [1, 2, 3], 3000, cache=cache, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 3000  # 46x the cache size, far past the model's 128-position context
    assert cache.length == 64 and cache.n_evicted == 3 + 2999 - 64
    assert [(t.data_ptr(), t.shape) for t in (*cache.k, *cache.v)] == buffers and cache.nbytes() == nbytes


def test_bad_sizes_are_refused():
    model = tiny_model("tiny-gqa")
    with pytest.raises(ValueError, match="exceed the model's context"):
        SinkKVCache(model, 4, 200)
    cache = SinkKVCache(model, 4, 8)
    with pytest.raises(ValueError, match="feed them in chunks"):
        streaming_forward(model, cache, torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.slow
@torch.no_grad()
def test_streaming_chat_answers_like_plain_chat_on_smollm2():
    from minllama.core.chat_format import chat_format_for
    from minllama.core.checkpoint import load_pretrained

    model, tok = load_pretrained(smollm2_gguf())
    fmt = chat_format_for(tok)
    chat = StreamingChat(model, n_sink=4, window=1020)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for follow_up in ["And of Italy?", None]:
        prompt = fmt.encode_dialog(tok, messages)
        ours = "".join(chat.stream_text(tok, prompt, 24))
        assert ours == "".join(stream_text(model, tok, prompt, 24))
        messages.append({"role": "assistant", "content": ours})
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    assert chat.cache.n_evicted == 0 and chat.cache.length == len(chat.history)


@torch.no_grad()
def test_streaming_chat_feeds_only_new_tokens_and_cuts_back_a_divergent_history():
    from extend_helpers import byte_bpe_tokenizer

    model, tok = tiny_model("tiny-gqa", sharp=4.0), byte_bpe_tokenizer()
    chat = StreamingChat(model, n_sink=4, window=100)
    first = tok.encode("hello there")
    "".join(chat.stream_text(tok, first, 5))
    assert chat.history[:len(first)] == first and chat.cache.length == len(chat.history) == len(first) + 4
    # the next prompt shares only the first turn (the answer was "re-tokenized" differently): cut back, refeed
    second = first + tok.encode(" and again")
    answer = "".join(chat.stream_text(tok, second, 5))
    assert chat.history[:len(second)] == second and chat.cache.length == len(chat.history)
    # the cache now holds exactly the history: same answer as a fresh cache fed the same prompt
    fresh = StreamingChat(model, n_sink=4, window=100)
    assert "".join(fresh.stream_text(tok, second, 5)) == answer
    with pytest.raises(ValueError, match="adds nothing"):
        "".join(chat.stream_text(tok, chat.history, 5))
