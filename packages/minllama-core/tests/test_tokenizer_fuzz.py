r"""Tokenizer properties over arbitrary Unicode text (hypothesis, derandomized: the same examples on every run).

* no crash, for any text without lone surrogates (which are not Unicode text: str.encode refuses them);
* ids equal to the reference library with the same pre-tokenizer: HF ``tokenizers`` for byte-level BPE (SmolLM2's
  GGUF, and a Llama-3-shaped tokenizer.json), ``tiktoken`` for Llama 3's tiktoken file; except for characters of
  the newest Unicode versions (``knows_same_characters``): a pre-tokenizer regex puts a character in \p{L} only if
  its engine's Unicode tables list it (tokenizers 0.23: Unicode 16; our ``regex``: Unicode 17), so U+323B0 (CJK
  extension J, Unicode 17) + "'s" splits differently;
* decode(encode(s)) == s, except for what the vocabulary cannot represent, asserted exactly:
  - SmolLM2 has no token for the bytes in ``SMOL_MISSING``: six ASCII control characters and the UTF-8 lead bytes
    0xF1 and 0xF2 (code points U+40000-U+BFFFF, planes 4-11, where Unicode assigns no character); like HF
    ``tokenizers``, encoding drops those bytes (a dropped lead byte leaves its continuation bytes, which decode
    as U+FFFD);
  - Llama 3's tiktoken vocabulary has all 256 bytes: exact;
  - SentencePiece with byte fallback (Llama 2) and identity normalization: exact; without byte fallback, each
    run of characters outside the vocabulary decodes as sentencepiece's <unk> surface " ⁇ "; with a normalizer
    (NFKC, extra whitespace removed) the text comes back normalized, exactly as sentencepiece decodes it.

The fixtures (the real SmolLM2 GGUF, its HF oracle, the tiktoken file, the tiny SentencePiece model) are those of
test_tokenizer.py.
"""
import io
import json
import random
import unicodedata

import regex
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minllama.core.tokenizer import SentencePieceTokenizer, load_tokenizer
from test_tokenizer import (llama3, llama3_file, llama3_oracle, llama3_style_oracle, smol,  # noqa: F401 (fixtures)
                            smol_oracle, smol_reader, sp, sp_file, sp_oracle)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# Pieces that plain random text rarely builds: specials (whole and broken), contractions, digit runs, exotic
# whitespace, combining marks, ZWJ sequences, flags.
TRICKY = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|im_", "|>", "'s",
          "'LL", "'ve", " 123456", "٣٤٥", "½", "\u3000", "\u2028", "\x85", "\xa0", "\r\n", "\n\n ", "  \t", "e\u0301",
          "👨‍👩‍👧‍👦", "🇫🇷", "👍🏽", "\ufeff", "\x00"]
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(TRICKY)), max_size=6).map("".join)
ASSIGNED = regex.compile(r"\p{Assigned}")
SMOL_MISSING = bytes([0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)])


def knows_same_characters(text: str) -> bool:
    """False if ``text`` holds a character that ``regex`` knows but this Python's ``unicodedata`` does not yet (3.11:
    Unicode 14): of a Unicode version that the reference libraries may not know either."""
    return not any(unicodedata.category(c) == "Cn" and ASSIGNED.match(c) for c in text)


def test_smollm2_vocabulary_lacks_exactly_the_documented_bytes(smol):
    assert bytes(b for b in range(256) if bytes([b]) not in smol.encoder) == SMOL_MISSING


@FUZZ
@given(text=TEXT)
def test_smollm2_matches_tokenizers_and_round_trips(smol, smol_oracle, text):
    ids = smol.encode(text)
    assert ids == smol_oracle.encode(text).ids or not knows_same_characters(text)
    assert smol.decode_bytes(ids) == text.encode().translate(None, SMOL_MISSING)
    if not any(b in SMOL_MISSING for b in text.encode()):
        assert smol.decode(ids) == text
    plain = smol.encode(text, allow_special=False)  # specials as plain text: the same bytes come back
    assert smol.decode_bytes(plain) == text.encode().translate(None, SMOL_MISSING)


def test_the_newest_characters_split_differently_in_tokenizers(smol, smol_oracle):
    """The reason for ``knows_same_characters``; if this fails, the tokenizers library has caught up."""
    text = "\U000323b0's"  # a CJK extension J ideograph (Unicode 17), then a contraction
    assert smol.pre_tokenize(text) == ["\U000323b0", "'s"] and not knows_same_characters(text)
    assert smol.encode(text) != smol_oracle.encode(text).ids


def test_round_trip_of_the_characters_smollm2_cannot_hold(smol):
    assert smol.decode(smol.encode("a\x04b\x1dc")) == "abc"
    assert smol.decode(smol.encode("x\U00050000y")) == "x\ufffd\ufffd\ufffdy"  # lead byte 0xF1 dropped


@FUZZ
@given(text=TEXT)
def test_llama3_tiktoken_matches_tiktoken_and_round_trips_exactly(llama3, llama3_oracle, text):
    ids = llama3.encode(text)
    if knows_same_characters(text):
        assert ids == llama3_oracle.encode(text, allowed_special="all")
        assert llama3.encode(text, allow_special=False) == llama3_oracle.encode(text, disallowed_special=())
    assert llama3.decode(ids) == text


def test_llama3_shaped_tokenizer_json_matches_tokenizers(llama3_style_oracle, tmp_path):
    """A tokenizer.json with Llama 3's Split regex, ByteLevel without regex and ignore_merges (read by
    load_tokenizer) against the tokenizers library reading the same file."""
    llama3_style_oracle.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|eot_id|>"}))
    tok = load_tokenizer(tmp_path)

    @FUZZ
    @given(text=TEXT)
    def check(text):
        ids = tok.encode(text)
        assert ids == llama3_style_oracle.encode(text).ids or not knows_same_characters(text)
        assert tok.decode_bytes(ids) == text.encode().translate(None, SMOL_MISSING)  # SmolLM2's vocabulary

    check()


@FUZZ
@given(text=TEXT)
def test_sentencepiece_with_byte_fallback_round_trips_exactly(sp, sp_oracle, text):
    ids = sp.encode(text)
    assert ids == sp_oracle.encode(text)
    assert sp.decode(ids) == text == sp_oracle.decode(ids)


def train_sentencepiece(**options) -> bytes:
    """A tiny BPE model without byte fallback, on test_tokenizer's corpus."""
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog hello world naïve café über straße привет мир γειά σου "
             "κόσμε 你好 世界 東京 12345 3.14 def return import class").split()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]),
        model_writer=model, vocab_size=200, model_type="bpe", byte_fallback=False, character_coverage=1.0,
        num_threads=1, minloglevel=2, **options)
    return model.getvalue()


def test_sentencepiece_without_byte_fallback_turns_unknown_runs_into_unk():
    proto = train_sentencepiece(normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok, oracle = SentencePieceTokenizer(model_proto=proto), spm.SentencePieceProcessor(model_proto=proto)
    pieces = (oracle.id_to_piece(i) for i in range(oracle.get_piece_size())
              if not (oracle.is_control(i) or oracle.is_unknown(i)))
    known = set("".join(pieces).replace("▁", " ")) | {" "}
    unknown_run = regex.compile("[^" + regex.escape("".join(sorted(known))) + "]+")
    assert tok.decode(tok.encode("dog ½ café 😀😀 x")) == "dog  ⁇  café  ⁇  x"

    @FUZZ
    @given(text=TEXT)
    def check(text):
        ids = tok.encode(text)
        assert tok.decode(ids) == unknown_run.sub(" \u2047 ", text) == oracle.decode(ids)

    check()


def test_sentencepiece_with_a_normalizer_decodes_the_normalized_text():
    proto = train_sentencepiece()  # sentencepiece's defaults: nmt_nfkc, extra whitespace removed
    tok, oracle = SentencePieceTokenizer(model_proto=proto), spm.SentencePieceProcessor(model_proto=proto)
    assert tok.decode(tok.encode("  the   ｆｏｘ  ")) == "the fox"

    @FUZZ
    @given(text=TEXT)
    def check(text):
        ids = tok.encode(text)
        assert tok.decode(ids) == oracle.decode(ids)

    check()
