"""Generation: sampling rules, batched == one-at-a-time, cached == recomputed, stops, streaming, errors."""
import importlib

import pytest
import torch

from core_helpers import tiny_model
from minllama.core.generate import generate, generate_stream, sample


def greedy_by_recomputation(model, prompt, n):
    """The oracle: no cache, the whole sequence recomputed for every new token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa", "tiny-mqa", "tiny-llama3"])
def test_cached_greedy_equals_recomputation(name):
    model = tiny_model(name)
    prompt = torch.randint(0, 256, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    assert generate(model, [prompt], 24) == [greedy_by_recomputation(model, prompt, 24)]


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
    model = tiny_model("tiny-llama3")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 17, 6, 30)]
    alone = [generate(model, [p], 20)[0] for p in prompts]
    assert generate(model, prompts, 20) == alone


def test_stop_ids_cut_each_row_independently():
    model = tiny_model("tiny-gqa")
    prompts = [[5, 6, 7], [9, 9]]
    free = generate(model, prompts, 12)
    stop = free[0][3]  # the 4th token of row 0 becomes a stop id
    cut = generate(model, prompts, 12, stop_ids={stop})
    assert cut[0] == free[0][:free[0].index(stop) + 1]
    assert cut[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_stop_strings_need_and_use_a_tokenizer():
    class CharTokenizer:  # token id = character code
        stop_ids = set()

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    model = tiny_model("tiny-gqa")
    free = generate(model, [[65, 66]], 16)[0]
    target = CharTokenizer().decode(free[4:6])
    cut = generate(model, [[65, 66]], 16, stop_strings=[target], tokenizer=CharTokenizer())[0]
    assert target in CharTokenizer().decode(cut) and target not in CharTokenizer().decode(cut[:-1])
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], 4, stop_strings=["x"])


def test_greedy_sampling_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top_k = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(300)}
    assert top_k == {0, 1}
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (0.15) completes it; 3 and 4 are excluded
    top_p = {int(sample(logits, 1.0, top_p=0.8, generator=g)) for _ in range(300)}
    assert top_p == {0, 1, 2}


def test_temperature_sampling_follows_the_softmax():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.log().expand(20000, 3), 1.0, generator=g)
    freq = torch.bincount(draws, minlength=3) / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    sharp = torch.bincount(sample(probs.log().expand(20000, 3), 0.5, generator=g), minlength=3) / 20000
    expected = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    torch.testing.assert_close(sharp, expected, atol=0.015, rtol=0)


def test_seeded_sampling_is_reproducible():
    model = tiny_model("tiny-gqa")
    run = lambda: generate(model, [[1, 2, 3]], 10, temperature=0.9, top_p=0.95,
                           generator=torch.Generator().manual_seed(7))
    assert run() == run()


def test_stream_yields_the_same_tokens_as_generate():
    model = tiny_model("tiny-mha")
    streamed = [int(t[0]) for t in generate_stream(model, [[3, 1, 4, 1, 5]], 15)]
    assert streamed == generate(model, [[3, 1, 4, 1, 5]], 15)[0]


def test_prompt_longer_than_context_is_a_clear_error():
    model = tiny_model("tiny-gqa")
    with pytest.raises(ValueError, match="context is 128"):
        generate(model, [[1] * 200], 5)


def test_generation_stops_at_the_context_end():
    model = tiny_model("tiny-gqa")
    assert len(generate(model, [[1] * 120], 50)[0]) == 8


def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny_model("tiny-gqa")
    assert generate(model, [[7, 8, 9]], 12, compile=True) == generate(model, [[7, 8, 9]], 12)


def test_many_models_compile_in_one_process():
    """Each model compiles its own copy of the decode step: with a recompile limit of 2 per code object, a third
    model would fail (fullgraph=True) if all shared one function's compiled versions."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for name in ("tiny-gqa", "tiny-mqa", "tiny-mha"):
            model = tiny_model(name)
            assert generate(model, [[7, 8, 9]], 4, compile=True) == generate(model, [[7, 8, 9]], 4)


def test_top_k_zero_means_no_truncation():
    logits = torch.randn(3, 20)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample(logits, 1.0, top_k=0, generator=g1), sample(logits, 1.0, generator=g2))


def test_the_default_cache_fits_the_call_and_a_long_cpu_prompt_gives_its_memory_back(monkeypatch):
    """Eager generation makes a cache of exactly prompt + new tokens (compiled generation a power of two, so that
    another length reuses the compiled step), and after a CPU prompt of RELEASE_AFTER_TOKENS or more returns the freed
    activations' pages to the OS (memory.py), once, before the first token."""
    gen = importlib.import_module("minllama.core.generate")  # the module (the package exports its function)
    made, events, static_cache = [], [], gen.StaticKVCache

    def recording_cache(model, batch_size, max_len):
        made.append(max_len)
        return static_cache(model, batch_size, max_len)

    monkeypatch.setattr(gen, "StaticKVCache", recording_cache)
    monkeypatch.setattr(gen, "release_free_memory", lambda: events.append("released"))
    model = tiny_model("tiny-gqa", max_seq_len=512)
    for length, released in ((gen.RELEASE_AFTER_TOKENS - 1, []), (gen.RELEASE_AFTER_TOKENS, ["released"])):
        events.clear()
        stream = generate_stream(model, [[1] * length], 5)
        next(stream)
        assert events == released, length
        events.append("token")
        list(stream)
        assert events == released + ["token"]  # not per token
        assert made[-1] == length + 5
    monkeypatch.setattr(gen, "compiled_decode_step", lambda model: gen._decode_step)  # the sizing, not compiling
    generate(model, [[1, 2, 3]], 5, compile=True)
    assert made[-1] == 256  # compiled: _cache_bucket's power of two (at least 256)
