"""Tokenizers, each checked against an independent implementation:

* SmolLM2 (byte-level BPE from the real GGUF) vs the HF ``tokenizers`` library built from the same vocab and merges
  with SmolLM2's pre-tokenizer, and vs transformers' own GGUF loader;
* Llama 3 (tiktoken format) vs the ``tiktoken`` library on a real tiktoken file written here;
* SentencePiece (a tiny Llama-style model trained here) vs the ``sentencepiece`` library's own decoding, and,
  rebuilt from a GGUF vocabulary, vs the original model and transformers' GGUF loader.

The chat formats built on these tokenizers are tested in test_chat_format.py (with the fixtures defined here).
"""
import base64
import io
import json
import random

import gguf
import pytest
import sentencepiece as spm
import tiktoken
import tiktoken.load
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from minllama.core.chat_format import Llama2ChatFormat
from minllama.core.tokenizer import (ByteLevelBPETokenizer, SentencePieceTokenizer, StreamDecoder,
                                     TiktokenBPETokenizer, load_tokenizer, tokenizer_from_gguf)

TEXTS = [
    "Hello, world! Héllo wörld, ça va? Ünïcödé straße Ærøskøbing",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Γειά σου κόσμε· ἀρχή",
    "你好，世界。東京は日本の首都です。한국어 텍스트",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ ok",
    "def f(x):\n\treturn {'a': x**2, \"b\": [1, 2]}  # comment\n",
    "numbers 12345 3.14 -0.5e10 1,000,000 2024-11-28 v1.2.3 $100",
    "tabs\t\tand  multiple   spaces\r\nwindows line\r\n\ttrailing spaces   ",
    "\n\n\nleading newlines and   \n  mixed \n\n whitespace \t",
    "I'm sure they'll say it's 'quoted' and WE'RE LOUD",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>",
    " ",
    "",
]
# Numerals that only SmolLM2's digit-isolating pre-tokenizer splits off from a preceding space.
NUMERALS = "x ² y ½ z ٣٤٥ and ⅷ １２３"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Meta's llama3/tokenizer.py pat_str
META_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - 9)])  # Meta's Llama 3.1+ list
LLAMA30_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                     "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                    + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])  # Meta's Llama 3.0 list


def stream(tokenizer, ids) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def write_gguf(path, *calls) -> str:
    """A GGUF file with metadata only: ``calls`` are (GGUFWriter method, value) pairs."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for method, value in calls:
        getattr(writer, method)(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# --------------------------------------------------------------------------------------------- SmolLM2 (byte-level)


@pytest.fixture(scope="module")
def smol_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_oracle(smol_reader):
    """The HF ``tokenizers`` BPE from the GGUF's vocab and merges, with SmolLM2's tokenizer.json pre-tokenizer:
    Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)] (llama.cpp: pre = "smollm")."""
    field = lambda key: smol_reader.fields[key].contents()  # noqa: E731
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                          [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


@pytest.fixture(scope="module")
def smol_transformers(smollm2_gguf):
    """transformers' own GGUF tokenizer. NOTE (transformers 5.24): its GGUF converter ignores
    tokenizer.ggml.pre = "smollm" and builds a plain ByteLevel pre-tokenizer without the Digits step, so it
    differs on non-ASCII numerals after a space (" ²", " ٣"); ASCII digits agree because SmolLM2 has no merges
    joining a space or another digit to a digit."""
    import os

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))


def test_smollm2_metadata(smol):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id, smol.family) == (49152, 1, 2, 2, "chatml")
    assert smol.special_tokens["<|im_start|>"] == 1 and smol.special_tokens["<|im_end|>"] == 2
    assert smol.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>


@pytest.mark.parametrize("text", TEXTS + [NUMERALS])
def test_smollm2_matches_tokenizers_library(smol, smol_oracle, text):
    ids = smol.encode(text)
    assert ids == smol_oracle.encode(text).ids
    assert smol.decode(ids) == text == smol_oracle.decode(ids, skip_special_tokens=False)


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Short random strings over the characters where pre-tokenizers disagree most easily: exotic whitespace
    (\x0b \x1c \x85 \xa0 \u2000 \u2028 \u3000), contractions, numerals of all kinds, marks, ZWJ, specials."""
    alphabet = [*"aZé ß\t\n\r  \x0b\x0c\x1c\x1d\x85\xa0\u2000\u2028\u3000'sStTdDlLmMvVrReE0123456789²½٣١ⅷ１.,;:!?-_()",
                *"[]{}<>|/\\\"#$%^&*+=~`@😀👍🏽\u200d\ufe0fПрΓε你好مरह्ि\x04", "<|im_start|>", "<|im_end|>", "'LL"]
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 25))) for _ in range(n)]


def test_smollm2_random_strings(smol, smol_oracle):
    for text in random_texts(1000):
        assert smol.encode(text) == smol_oracle.encode(text).ids, repr(text)


def test_smollm2_matches_transformers_gguf_loader(smol, smol_transformers):
    for text in TEXTS:
        assert smol.encode(text) == smol_transformers.encode(text, add_special_tokens=False), text


def test_special_tokens_only_when_allowed(smol, smol_oracle):
    text = "a<|im_end|>b"
    assert smol.encode(text) == [smol.encode("a")[0], 2, smol.encode("b")[0]]
    plain = smol.encode(text, allow_special=False)
    assert 2 not in plain and smol.decode(plain) == text
    assert smol.encode("hi", bos=True, eos=True) == [1, *smol.encode("hi"), 2]


def test_a_token_made_by_two_merges(tmp_path):
    """Llama 3's tokenizer.json lists several merges that make one token; ``set_merges`` keeps the first at the
    token and the others aside. Here "abc" is made by a+bc (rank 2) and by ab+c (rank 3), and "abc" itself only
    reaches ab+c (a+b ranks before b+c): the tokenizers library on the same file is the oracle."""
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc", "ca", "cab"])}
    merges = [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c"), ("c", "a"), ("c", "ab"), ("ca", "b")]
    oracle = tokenizers.Tokenizer(models.BPE(vocab, merges))
    oracle.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    oracle.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.merge_ranks == {(a.encode(), b.encode()): r for r, (a, b) in enumerate(merges)}
    for text in ["abc", "abca", "cabc", "bcab", "aabbcc", "cab", "cabcab", "bca", "abcabcabc"]:
        assert tok.encode(text) == oracle.encode(text).ids, text
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["merges"].append(["bc", "a"])  # "bca" is no token: the tokenizers library refuses it too
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="merge b'bc' \\+ b'a' makes a token that is not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(Exception, match="`bca` out of vocabulary"):
        tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


def test_damaged_ids_are_refused_and_an_added_token_on_a_vocab_id_keeps_the_merges_bytes():
    for ids in ({"a": 0, "b": -1}, {"a": 0, "b": 10**9}):  # the second would be a list of 10**9 entries
        with pytest.raises(ValueError, match="token ids run from"):
            ByteLevelBPETokenizer(ids, [], {}, [])
    tok = ByteLevelBPETokenizer({"a": 0, "b": 1, "ab": 2}, [("a", "b")], {"<X>": 2}, [])
    assert tok.merge_ranks == {(b"a", b"b"): 0} and tok.decode([2]) == "<X>"  # id 2 decodes as the added token

@pytest.fixture(scope="module")
def llama3_style_oracle(smol_oracle):
    """SmolLM2's vocab with Llama 3's HF pre-tokenizer (Split(Llama 3 regex) + ByteLevel without regex),
    ``ignore_merges`` and Llama 3's specials appended: the shape of Meta's HF tokenizer.json."""
    tok = tokenizers.Tokenizer.from_str(smol_oracle.to_str())
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in META_SPECIALS])
    return tok


def test_tokenizer_json_and_gguf_in_llama3_shape(llama3_style_oracle, smol_reader, tmp_path):
    """Two loaders, one oracle: a tokenizer.json written by the tokenizers library itself, and a GGUF with
    tokenizer.ggml.pre = "llama-bpe" written by gguf's GGUFWriter."""
    llama3_style_oracle.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|eot_id|>"}))
    field = lambda key: smol_reader.fields[key].contents()  # noqa: E731
    path = write_gguf(tmp_path / "l3.gguf", ("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", "llama-bpe"),
                      ("add_token_list", field("tokenizer.ggml.tokens") + META_SPECIALS),
                      ("add_token_types", field("tokenizer.ggml.token_type") + [3] * len(META_SPECIALS)),
                      ("add_token_merges", field("tokenizer.ggml.merges")),
                      ("add_bos_token_id", 49152), ("add_eos_token_id", 49152 + 9))
    for tok in (load_tokenizer(tmp_path), tokenizer_from_gguf(path)):
        assert (tok.family, tok.bos_id, tok.eos_id, tok.ignore_merges) == ("llama3", 49152, 49161, True)
        for text in TEXTS + [NUMERALS, "<|begin_of_text|>a\n\n\nb  \n c 1234567<|eot_id|>"]:
            assert tok.encode(text) == llama3_style_oracle.encode(text).ids, text


# ------------------------------------------------------------------------------------------ Llama 3 (tiktoken file)


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory, smol):
    """A real tiktoken file: the 256 bytes, then SmolLM2's merged tokens in merge order, then unreachable filler
    (bytes 0xF8.. never occur in UTF-8) up to 128000 ranks, so the specials land on Meta's ids 128000...."""
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in sorted(smol.merge_ranks, key=smol.merge_ranks.get):
        ranks.setdefault(left + right, len(ranks))
    for n in range(128000 - len(ranks)):
        ranks[b"\xf8" + n.to_bytes(3, "big")] = len(ranks)
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def llama3(llama3_file):
    return TiktokenBPETokenizer(llama3_file)


@pytest.fixture(scope="module")
def llama3_oracle(llama3_file):
    return tiktoken.Encoding("llama3-test", pat_str=LLAMA3_REGEX,
                             mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(llama3_file)),
                             special_tokens={t: 128000 + i for i, t in enumerate(META_SPECIALS)})


def test_llama3_special_token_layout(llama3):
    assert llama3.vocab_size == 128256 and (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128000, 128001, 128004)
    assert [llama3.special_tokens[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                               "<|eot_id|>", "<|python_tag|>")] == [128006, 128007, 128008, 128009,
                                                                                    128010]
    assert llama3.special_tokens["<|reserved_special_token_246|>"] == 128255
    assert llama3.stop_ids == {128001, 128008, 128009} and llama3.family == "llama3"


@pytest.mark.parametrize("text", TEXTS + [NUMERALS, "<|begin_of_text|>x<|eot_id|>", "a\n\n\nb  \n c 1234567"])
def test_llama3_matches_tiktoken(llama3, llama3_oracle, text):
    ids = llama3.encode(text)
    assert ids == llama3_oracle.encode(text, allowed_special="all")
    assert llama3.encode(text, allow_special=False) == llama3_oracle.encode(text, disallowed_special=())
    assert llama3.decode(ids) == text == llama3_oracle.decode(ids)


def test_llama3_random_strings(llama3, llama3_oracle):
    for text in random_texts(1000, seed=1):
        assert llama3.encode(text) == llama3_oracle.encode(text, allowed_special="all"), repr(text)


# -------------------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    """A tiny Llama-2-style model (BPE, byte fallback, identity normalization, dummy prefix, split digits)."""
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog hello world naïve café über straße привет мир γειά σου "
             "κόσμε 你好 世界 東京 12345 3.14 def return import class").split()
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def sp(sp_file):
    return SentencePieceTokenizer(sp_file)


@pytest.fixture(scope="module")
def sp_oracle(sp_file):
    return spm.SentencePieceProcessor(model_file=str(sp_file))


SP_TEXTS = [t for t in TEXTS if "<|" not in t] + ["  two leading spaces", "Hindi नमस्ते and 😀 use byte pieces"]


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_matches_library(sp, sp_oracle, text):
    ids = sp.encode(text, bos=True)
    assert ids == [sp_oracle.bos_id(), *sp_oracle.encode(text)] and sp.decode(ids) == text
    assert sp.encode(text, eos=True)[-1] == sp_oracle.eos_id() == sp.eos_id
    for start in range(len(ids)):  # every slice that is valid UTF-8 decodes as in sentencepiece (leading spaces!)
        for end in range(start + 1, len(ids) + 1):
            if "\ufffd" not in (want := sp_oracle.decode(ids[start:end])):
                assert sp.decode(ids[start:end]) == want, (start, end)


def test_sentencepiece_byte_fallback(sp, sp_oracle):
    ids = sp.encode("😀")
    assert [sp_oracle.id_to_piece(i) for i in ids[-4:]] == [f"<0x{b:02X}>" for b in "😀".encode()]
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.family, sp.stop_ids) == (1, 2, None, "llama2", {2})
    for ids in ([0], [1, 0, 5], [5, 0], [sp_oracle.piece_to_id("<0x20>"), 5]):  # <unk> and a space byte first
        assert sp.decode(ids) == sp_oracle.decode(ids)


def test_sentencepiece_from_gguf(sp, sp_oracle, tmp_path):
    """A Llama-2-style GGUF vocabulary, written the way llama.cpp's converter does (pieces, scores, types),
    tokenizes exactly like the SentencePiece model it came from."""
    n = sp_oracle.get_piece_size()

    def kind(i: int) -> int:  # SentencePiece's piece types, which GGUF numbers the same way
        tests = ((2, sp_oracle.is_unknown), (3, sp_oracle.is_control), (6, sp_oracle.is_byte))
        return next((code for code, test in tests if test(i)), 1)

    # the model shape is there only so that transformers accepts the file
    shape = [("add_context_length", 64), ("add_embedding_length", 8), ("add_block_count", 1),
             ("add_feed_forward_length", 16), ("add_head_count", 2), ("add_layer_norm_rms_eps", 1e-5)]
    path = write_gguf(tmp_path / "spm.gguf", *shape, ("add_tokenizer_model", "llama"),
                      ("add_token_list", [sp_oracle.id_to_piece(i) for i in range(n)]),
                      ("add_token_scores", [sp_oracle.get_score(i) for i in range(n)]),
                      ("add_token_types", [kind(i) for i in range(n)]), ("add_bos_token_id", 1),
                      ("add_eos_token_id", 2), ("add_unk_token_id", 0), ("add_add_space_prefix", True))
    tok = tokenizer_from_gguf(path)
    assert isinstance(tok, SentencePieceTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    from transformers import AutoTokenizer

    # transformers' GGUF converter re-implements SentencePiece with the tokenizers library; it agrees except
    # on leading whitespace (transformers 5.24: "  lead" gets one '▁' too few), where sentencepiece is the truth.
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in SP_TEXTS:
        ids = tok.encode(text, bos=True)
        assert ids == [1, *sp_oracle.encode(text)] and tok.decode(ids) == sp_oracle.decode(ids) == text
        if text and not text[0].isspace():
            assert ids == hf.encode(text), text


# ------------------------------------------------------------------------------------------------------ streaming


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("name", ["smol", "llama3", "sp"])
def test_stream_decoder(name, request):
    tok = request.getfixturevalue(name)
    text = " Emoji 😀👍🏽👨‍👩‍👧‍👦 and 你好世界, नमस्ते ✓"
    for ids in (tok.encode(text), tok.encode(text, bos=True, eos=True)):
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
        assert any(not valid_utf8(tok.decode_bytes(ids[:k])) for k in range(len(ids)))  # characters were split
        for k in range(1, len(ids) + 1):  # after each push: all complete characters so far, nothing more
            emitted, data = "".join(pieces[:k]).encode(), tok.decode_bytes(ids[:k])
            assert data.startswith(emitted) and len(data) - len(emitted) <= 3
    assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_sentencepiece_mid_dialog(sp):
    """The dummy-prefix space is dropped only at the start of the stream, also after BOS or a lone '▁'."""
    ids = Llama2ChatFormat().encode_dialog(sp, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": " world 😀"},
                                                {"role": "user", "content": "x"}])
    for start in range(len(ids)):
        assert "".join(stream(sp, ids[start:])) == sp.decode(ids[start:])


# ------------------------------------------------------------------------------------------ save / load and errors


def test_save_load_byte_level(smol, smol_oracle, tmp_path):
    smol.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ByteLevelBPETokenizer)
    for attr in ("encoder", "merge_ranks", "special_tokens", "control_tokens", "patterns", "bos_id", "eos_id",
                 "pad_id", "family", "chat_template", "vocab_size"):
        assert getattr(back, attr) == getattr(smol, attr), attr
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # HF can read what we wrote
    for text in TEXTS + [NUMERALS]:
        assert back.encode(text) == smol.encode(text) == hf.encode(text).ids


def test_save_load_tiktoken(llama3, tmp_path):
    llama3.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, TiktokenBPETokenizer) and not (tmp_path / "tiktoken_special_tokens.json").exists()
    assert (back.encoder, back.special_tokens) == (llama3.encoder, llama3.special_tokens)
    assert llama3.pad_id == 128004 and llama3.stop_ids == {128001, 128008, 128009}  # 3.1+ by default
    custom = TiktokenBPETokenizer(tmp_path / "tokenizer.model", special_tokens=LLAMA30_SPECIALS)
    assert custom.pad_id is None and custom.stop_ids == {128001, 128009}  # Llama 3.0: no pad, no <|eom_id|>
    custom.save(tmp_path / "31")
    assert load_tokenizer(tmp_path / "31").special_tokens == custom.special_tokens


def test_save_load_sentencepiece(sp, tmp_path):
    sp.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, SentencePieceTokenizer)
    assert all(back.encode(t) == sp.encode(t) for t in SP_TEXTS)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="tokenizer.model: not a readable SentencePiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="tokenizer.model: not a tiktoken"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{ garbage")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(ValueError, match="only byte-level BPE"):
        load_tokenizer(tmp_path)


def test_unsupported_gguf_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer.ggml.model 'bert'"):
        tokenizer_from_gguf(write_gguf(tmp_path / "bert.gguf", ("add_tokenizer_model", "bert")))
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'qwen2'"):
        tokenizer_from_gguf(write_gguf(tmp_path / "q.gguf", ("add_tokenizer_model", "gpt2"),
                                       ("add_tokenizer_pre", "qwen2"), ("add_token_list", ["a"])))


# ------------------------------------------------------------------------------------ module layout, protobuf writer


def test_tokenizer_module_keeps_every_name():
    """The code lives in bpe.py, bpe_files.py, sentencepiece_*.py and tokenizer_base.py; everything that
    ``minllama.core.tokenizer`` offered before that split is still importable from it, as the same object."""
    import minllama.core.tokenizer as tokenizer
    from minllama.core import bpe, bpe_files, sentencepiece_tokenizer, tokenizer_base

    names = ["GPT2_PATTERN", "LLAMA3_PATTERN", "GGUF_PRE_TOKENIZERS", "LLAMA3_SPECIAL_TOKENS", "STOP_TOKENS",
             "GGUF_CONTROL", "GGUF_USER_DEFINED", "B2U", "U2B", "Tokenizer", "SentencePieceTokenizer",
             "TiktokenBPETokenizer", "ByteLevelBPETokenizer", "StreamDecoder", "load_tokenizer", "tokenizer_from_gguf",
             "gguf_value"]
    assert [n for n in names if not hasattr(tokenizer, n)] == []
    assert (tokenizer.ByteLevelBPETokenizer, tokenizer.StreamDecoder, tokenizer.SentencePieceTokenizer) == (
        bpe_files.ByteLevelBPETokenizer, tokenizer_base.StreamDecoder, sentencepiece_tokenizer.SentencePieceTokenizer)
    assert issubclass(tokenizer.TiktokenBPETokenizer, bpe.BytePairEncoder)


def test_protobuf_wire_format_examples():
    """The examples of the protobuf encoding guide (protobuf.dev/programming-guides/encoding), written by hand."""
    from minllama.core.sentencepiece_proto import protobuf_message

    assert protobuf_message((1, 150)) == bytes.fromhex("089601")  # varint 150: 0x96 0x01
    assert protobuf_message((2, "testing")) == bytes.fromhex("120774657374696e67")  # length-delimited string
    assert protobuf_message((3, protobuf_message((1, 150)))) == bytes.fromhex("1a03089601")  # nested message
    assert protobuf_message((1, -1)) == bytes.fromhex("08ffffffffffffffffff01")  # negative int: 10 bytes
    assert protobuf_message((2, 1.0), (1, True)) == bytes.fromhex("150000803f" "0801")  # float32 LE, bool


def test_appended_pieces_are_read_by_sentencepiece(sp_file, sp_oracle):
    """``model_proto_piece`` entries appended to a serialized model are new pieces for the sentencepiece
    library, with their score (float32) and type (1 = NORMAL, 3 = CONTROL), after every old id."""
    from minllama.core.sentencepiece_proto import model_proto_piece

    n = sp_oracle.get_piece_size()
    proto = sp_file.read_bytes() + model_proto_piece("▁zqxj", -3.25) + model_proto_piece("<ctl>", 0.0, kind=3)
    back = spm.SentencePieceProcessor(model_proto=proto)
    assert back.get_piece_size() == n + 2 and [back.id_to_piece(i) for i in (n, n + 1)] == ["▁zqxj", "<ctl>"]
    assert (back.get_score(n), back.is_control(n), back.is_control(n + 1)) == (-3.25, False, True)
    assert [back.id_to_piece(i) for i in range(n)] == [sp_oracle.id_to_piece(i) for i in range(n)]
