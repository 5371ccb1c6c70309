"""A chat session keeps its cache between turns: each turn prefills only its new tokens, and answers exactly as a
fresh generation over the whole dialog would."""
import pytest

from core_helpers import tiny_model
from minllama.core.generate import stream_text
from minllama.core.tokenizer import B2U, GPT2_PATTERN, ByteLevelBPETokenizer
from minllama.core.session import ChatSession


def byte_tokenizer():
    return ByteLevelBPETokenizer({B2U[b]: b for b in range(256)}, [], {}, [GPT2_PATTERN])


def test_each_turn_prefills_only_its_new_tokens_and_answers_as_a_fresh_generation():
    model, tok = tiny_model("tiny-llama3"), byte_tokenizer()
    session = ChatSession(model)
    dialog = tok.encode("hello there")
    for turn in range(4):
        ids = []
        answer = "".join(session.stream_text(tok, dialog, 6, on_token=ids.append))
        assert answer == "".join(stream_text(model, tok, dialog, 6))  # the oracle: everything prefilled again
        assert session.last_prefill == (len(dialog) if turn == 0 else len(tok.encode(f" and {turn}")) + 1)
        dialog = dialog + ids + tok.encode(f" and {turn + 1}")  # the answer's last token was never fed: +1
    assert session.cache.length == len(session.history)


def test_a_diverging_history_rewinds_and_a_growing_chat_reallocates():
    model, tok = tiny_model("tiny-gqa", max_seq_len=1024), byte_tokenizer()
    session = ChatSession(model)
    "".join(session.stream_text(tok, tok.encode("abc def"), 4))
    assert session.cache.capacity == 256
    other = tok.encode("abc xyz")  # shares 4 tokens with the history only
    assert "".join(session.stream_text(tok, other, 4)) == "".join(stream_text(model, tok, other, 4))
    assert session.last_prefill == 3
    with pytest.raises(ValueError, match="adds nothing"):
        "".join(session.stream_text(tok, session.history, 4))
    long_prompt = other + tok.encode(" more" * 60)  # past the first 256-slot cache with the answer
    assert "".join(session.stream_text(tok, long_prompt, 8)) == "".join(stream_text(model, tok, long_prompt, 8))
    assert session.cache.capacity == 512


def test_an_interrupted_or_abandoned_answer_leaves_a_consistent_session():
    model, tok = tiny_model("tiny-gqa"), byte_tokenizer()
    session = ChatSession(model)
    prompt = tok.encode("one two")
    pieces = session.stream_text(tok, prompt, 10)
    next(pieces), next(pieces)
    pieces.close()  # the reader went away after two tokens
    assert session.history == session.history[:session.cache.length] and session.cache.length == len(prompt) + 1
    calls = {"n": 0}
    forward = model.forward

    def interrupted(*a, **kw):  # Ctrl-C arrives inside the third forward
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(*a, **kw)
    model.forward = interrupted
    more = session.history + tok.encode(" three")
    with pytest.raises(KeyboardInterrupt):
        "".join(session.stream_text(tok, more, 10))
    model.forward = forward
    assert len(session.history) == session.cache.length  # only what is surely complete is kept
    final = session.history + tok.encode(" four")
    assert "".join(session.stream_text(tok, final, 5)) == "".join(stream_text(model, tok, final, 5))
