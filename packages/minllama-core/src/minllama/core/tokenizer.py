"""Tokenizers: text <-> token ids for the three vocabulary formats Llama-family checkpoints ship with.

* ``SentencePieceTokenizer`` - Llama 1/2, TinyLlama: a SentencePiece ``tokenizer.model`` (protobuf), or one
  rebuilt from a GGUF file's vocabulary. We let the ``sentencepiece`` library do the encoding; what we add is
  the Llama conventions (BOS/EOS, byte-fallback decoding, the "dummy prefix" space that must be dropped only at
  the very start of a text).
* ``TiktokenBPETokenizer`` - Llama 3: Meta's ``tokenizer.model`` is a tiktoken file, one ``base64(bytes) rank``
  per line, plus 256 special tokens that are *not* in the file (their ids follow the last rank).
* ``ByteLevelBPETokenizer`` - GPT-2 style byte-level BPE from a GGUF file or an HF ``tokenizer.json``
  (SmolLM2, Llama 3 in HF format).

The last two are the same algorithm written out in plain Python (``_BytePairEncoder``):

1. split off special tokens (``<|eot_id|>``...) so text can never be merged into or across them;
2. *pre-tokenize* with one or more regexes into "words" (runs of letters, single digits, whitespace...),
   so merges never cross word boundaries - this is where models differ (SmolLM2 isolates every digit first);
3. inside a word, start from single bytes and repeatedly merge the adjacent pair with the best (lowest) rank.
   tiktoken ranks a pair by the rank of the concatenated token, GPT-2 by the pair's position in the merge list.

Decoding is concatenating each token's bytes; ``StreamDecoder`` does it incrementally for streaming.
"""
from __future__ import annotations

import base64
import codecs
import json
import struct
from pathlib import Path
from typing import Iterable

import regex

from .formats import gguf_field as gguf_value  # one reader of GGUF metadata for the weights and the tokenizer

# The GPT-2 pre-tokenizer (also HF's ByteLevel(use_regex=True)): contractions, letters, numbers, other symbols
# (each optionally after one space), and whitespace runs that leave their last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3 (Meta's tokenizer.py): case-insensitive contractions, numbers in groups of at most 3 digits, and
# newlines kept apart from other whitespace.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# llama.cpp's names (GGUF ``tokenizer.ggml.pre``) -> regexes applied one after the other. "smollm" isolates
# every digit before the GPT-2 regex, like SmolLM2's tokenizer.json: Sequence[Digits(individual), ByteLevel].
GGUF_PRE_TOKENIZERS = {
    "gpt2": [GPT2_PATTERN], "default": [GPT2_PATTERN], "llama-bpe": [LLAMA3_PATTERN], "llama3": [LLAMA3_PATTERN],
    **{name: [r"\p{N}", GPT2_PATTERN] for name in ("smollm", "starcoder", "refact", "codeshell")},
}
# Meta's Llama 3.1+ special tokens (ids 128000.., right after the 128000 BPE ranks), in Meta's order. Llama 3.0 has
# the same ids for BOS/EOS, the headers and <|eot_id|>, and reserved names for the others, which it never emits.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", *(f"<|reserved_special_token_{i}|>" for i in range(2, 247)),
]
# Tokens that end an assistant turn (or the whole document) in the chat formats we know.
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of tokens matched as whole strings


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: byte-level vocab files store tokens as text, so
    each of the 256 bytes is drawn as a visible character (printable Latin-1 as itself, the rest - controls,
    space (-> 'Ġ'), DEL... - as chr(256 + n) in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


B2U = _bytes_to_unicode()
U2B = {c: b for b, c in B2U.items()}


class Tokenizer:
    """What the rest of MinimalLlama needs from a tokenizer. Subclasses set the attributes in ``__init__`` and
    implement ``_encode_text``, ``decode_bytes``, ``vocab_size`` and ``save``."""

    family: str  # "llama2" | "llama3" | "chatml": selects the default chat format
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    special_tokens: dict[str, int]
    chat_template: str | None = None  # the Jinja template shipped with the checkpoint, kept for reference

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``allow_special=False`` encodes special-token strings such as ``<|eot_id|>``
        as plain text: use it for untrusted content so it cannot forge chat structure."""
        ids = self._encode_text(text, allow_special)
        for flag, tid, name in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
            if flag and tid is None:
                raise ValueError(f"this tokenizer has no {name} token")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half an emoji) becomes U+FFFD, exactly as ``StreamDecoder``."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], at_start: bool = True) -> bytes:
        """The raw bytes of ``ids`` (possibly incomplete UTF-8). ``at_start=False`` means the ids continue an
        earlier text, which matters only to SentencePiece's leading space."""
        raise NotImplementedError

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def stop_ids(self) -> set[int]:
        """Ids after which generation ends: EOS plus every known end-of-turn token present in the vocabulary."""
        return {self.eos_id} - {None} | {self.special_tokens[t] for t in STOP_TOKENS if t in self.special_tokens}

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 and TinyLlama. SentencePiece marks a word boundary with '▁' (U+2581) and, with
    ``add_dummy_prefix``, pretends every text starts with a space: "Hi" -> "▁Hi". Decoding drops that one space
    again, but only for the first piece of a text - a streaming decoder must know where the text starts.
    Characters outside the vocabulary fall back to byte pieces ``<0xNN>``, decoded as raw bytes."""

    family = "llama2"

    def __init__(self, model_path: str | Path | None = None, *, model_proto: bytes | None = None):
        import sentencepiece

        self.path = Path(model_path) if model_path is not None else Path("<model_proto>")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(
                model_file=str(model_path) if model_proto is None else None, model_proto=model_proto)
        except (OSError, RuntimeError, TypeError) as e:
            raise ValueError(f"{self.path}: not a readable SentencePiece model ({e}); pass the checkpoint's "
                             "tokenizer.model") from None
        sp, n = self.sp, self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None
                                                 for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
        self.special_tokens = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i)}
        # The surface bytes of every piece; control tokens (<s>, </s>) have none, as in sp.decode.
        self._bytes = [b"" if sp.is_control(i) else bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
                       else " \u2047 ".encode() if sp.is_unknown(i)  # sentencepiece's " ⁇ " for <unk>
                       else sp.id_to_piece(i).replace("▁", " ").encode() for i in range(n)]
        self._dummy_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("▁")  # the model's normalizer setting

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        # Like Meta's reference, control tokens are never parsed from text: "<s>" is four characters.
        return self.sp.encode(text)

    def decode_bytes(self, ids: Iterable[int], at_start: bool = True) -> bytes:
        out = []
        for i in map(int, ids):
            piece = self._bytes[i]
            if at_start and not self.sp.is_control(i):  # the first real piece: drop the dummy-prefix space
                if self._dummy_prefix and self.sp.id_to_piece(i).startswith("▁"):  # not <unk>, not <0x20>
                    piece = piece[1:]
                at_start = False
            out.append(piece)
        return b"".join(out)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


# ------------------------------------------------------------------------------------------------ byte-pair encoding


class _BytePairEncoder(Tokenizer):
    """Pre-tokenization + rank-based merging over bytes, shared by the tiktoken and GPT-2 formats.
    Subclasses fill ``encoder`` (token bytes -> id), ``special_tokens``, ``patterns`` and define ``_rank``."""

    ignore_merges = False  # if a whole word is a token, take it without merging (tiktoken; HF `ignore_merges`)

    def _setup(self, encoder: dict[bytes, int], special_tokens: dict[str, int], patterns: list[str]):
        self.encoder, self.special_tokens, self.patterns = encoder, dict(special_tokens), list(patterns)
        self.decoder = {i: b for b, i in encoder.items()} | {i: t.encode() for t, i in self.special_tokens.items()}
        self._regexes = [regex.compile(p) for p in self.patterns]
        # Longest first, so that of two specials starting at the same place the longer one wins.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("|".join(map(regex.escape, alternatives))) if alternatives else None
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max(self.decoder) + 1

    def _rank(self, left: bytes, right: bytes) -> int | None:
        raise NotImplementedError

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        ids, start = [], 0
        matches = self._special_re.finditer(text) if allow_special and self._special_re else ()
        for m in [*matches, None]:
            for word in self.pre_tokenize(text[start:m.start() if m else len(text)]):
                ids += self._encode_word(word)
            if m:
                ids.append(self.special_tokens[m.group()])
                start = m.end()
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Split into words with each regex in turn; text between matches is kept as words too (HF's
        "Isolated" behaviour), so nothing is ever lost."""
        words = [text] if text else []
        for pattern in self._regexes:
            split = []
            for word in words:
                end = 0
                for m in pattern.finditer(word):
                    split += [piece for piece in (word[end:m.start()], m.group()) if piece]  # gap, match
                    end = m.end()
                split += [word[end:]] if end < len(word) else []
            words = split
        return words

    def _encode_word(self, word: str) -> list[int]:
        if (ids := self._cache.get(word)) is None:
            data = word.encode()
            ids = [self.encoder[data]] if self.ignore_merges and data in self.encoder else \
                [self.encoder[p] for p in self._merge(data)]
            if len(self._cache) > 100_000:  # words repeat a lot; keep the cache, but bounded
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge(self, data: bytes) -> list[bytes]:
        """Byte-pair merging: repeatedly join the adjacent pair of best rank (leftmost on ties). Only the two
        neighbours of a merge get new ranks, so each step is one min() over a list."""
        # A byte without a token of its own is dropped, as by HF's BPE without an unknown token: SmolLM2's
        # vocabulary lacks six ASCII control characters (and bytes that never occur in UTF-8).
        parts = [data[i:i + 1] for i in range(len(data)) if data[i:i + 1] in self.encoder]

        def rank(i: int) -> float:  # rank of the pair (parts[i], parts[i + 1]); inf: it never merges
            r = self._rank(parts[i], parts[i + 1])
            return float("inf") if r is None else r

        ranks = [rank(i) for i in range(len(parts) - 1)]
        while ranks and (best := min(ranks)) != float("inf"):
            i = ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank(i - 1)
            if i < len(ranks):
                ranks[i] = rank(i)
        return parts

    def decode_bytes(self, ids: Iterable[int], at_start: bool = True) -> bytes:
        try:
            return b"".join(self.decoder[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (size {self.vocab_size})") from None


class TiktokenBPETokenizer(_BytePairEncoder):
    """Llama 3's ``tokenizer.model``: each line ``base64(token bytes) rank``; the rank is also the token id and
    the merge priority (a pair merges if its concatenation is a token, lowest rank first). The special tokens
    are appended after the last rank, in Meta's order (``LLAMA3_SPECIAL_TOKENS`` unless given)."""

    family = "llama3"
    ignore_merges = True

    def __init__(self, model_path: str | Path, special_tokens: list[str] | None = None):
        self.path, ranks = Path(model_path), {}
        try:
            for line in filter(bytes.strip, self.path.read_bytes().splitlines()):
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: not a tiktoken BPE file ({e}); Llama 3 needs Meta's original "
                             "tokenizer.model (lines of 'base64(token) rank')") from None
        names = list(LLAMA3_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        self._setup(ranks, {t: len(ranks) + i for i, t in enumerate(names)}, [LLAMA3_PATTERN])
        self.bos_id, self.eos_id = (self.special_tokens.get(t) for t in ("<|begin_of_text|>", "<|end_of_text|>"))
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>")  # Llama 3.1+; Meta's 3.0 has none

    def _rank(self, left: bytes, right: bytes) -> int | None:
        return self.encoder.get(left + right)

    def save(self, directory: str | Path) -> None:
        """``tokenizer.model`` in Meta's format; a non-default special-token list goes next to it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ranked = sorted(self.encoder.items(), key=lambda x: x[1])
        lines = (f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranked)
        (directory / "tokenizer.model").write_text("".join(lines))
        names = sorted(self.special_tokens, key=self.special_tokens.get)
        if names != LLAMA3_SPECIAL_TOKENS:
            (directory / "tiktoken_special_tokens.json").write_text(json.dumps(names))


class ByteLevelBPETokenizer(_BytePairEncoder):
    """GPT-2 style byte-level BPE (SmolLM2, Llama 3 from HF). Vocab files write each token's bytes through
    ``B2U`` and list merges "left right" in priority order; special/added tokens are stored as plain text and
    matched as whole strings (HF's per-token lstrip/rstrip/single_word flags are not supported - the Llama
    family and SmolLM2 do not use them)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: dict[str, int],
                 patterns: list[str], bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, ignore_merges: bool = False, control_tokens: set[str] | None = None,
                 chat_template: str | None = None):
        to_bytes = lambda t: bytes(U2B[c] for c in t)  # noqa: E731
        encoder = {to_bytes(t): i for t, i in vocab.items() if all(c in U2B for c in t)}
        self._setup(encoder, added_tokens, patterns)
        self.merge_ranks = {(to_bytes(a), to_bytes(b)): r for r, (a, b) in enumerate(merges)}
        self.ignore_merges, self.bos_id, self.eos_id, self.pad_id = ignore_merges, bos_id, eos_id, pad_id
        self.control_tokens = set(added_tokens) if control_tokens is None else set(control_tokens)
        self.chat_template = chat_template
        self.family = "llama3" if "<|start_header_id|>" in added_tokens else "chatml"

    def _rank(self, left: bytes, right: bytes) -> int | None:
        return self.merge_ranks.get((left, right))

    @classmethod
    def from_gguf(cls, reader) -> ByteLevelBPETokenizer:
        """From the ``tokenizer.ggml.*`` metadata of a GGUF file written by llama.cpp's converter."""
        get = lambda key, default=None: gguf_value(reader, key, default)  # noqa: E731
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        if tokens is None or get("tokenizer.ggml.model") != "gpt2":
            raise ValueError("this GGUF file has no byte-level BPE (tokenizer.ggml.model = 'gpt2') vocabulary")
        pre = get("tokenizer.ggml.pre", "gpt2")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"unknown GGUF pre-tokenizer {pre!r}; add its regexes to GGUF_PRE_TOKENIZERS")
        types = types or [1] * len(tokens)
        added = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)}
        control = {t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL}
        merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges", [])]
        return cls({t: i for i, t in enumerate(tokens)}, merges, added, GGUF_PRE_TOKENIZERS[pre],
                   bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
                   pad_id=get("tokenizer.ggml.padding_token_id"),
                   ignore_merges=pre in ("llama-bpe", "llama3"),  # as llama.cpp and Llama 3's tokenizer.json
                   control_tokens=control, chat_template=get("tokenizer.chat_template"))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> ByteLevelBPETokenizer:
        """From an HF ``tokenizer.json`` (+ ``tokenizer_config.json`` beside it for BOS/EOS/PAD and the chat
        template). Only what byte-level BPE models use is supported; anything else is a clear error."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            model = spec["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable HF tokenizer.json ({e})") from None
        if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
            raise ValueError(f"{path}: only byte-level BPE tokenizer.json files are supported (this one is a "
                             f"{model.get('type')} model); for SentencePiece models use tokenizer.model")
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        control = {t["content"] for t in spec.get("added_tokens", []) if t.get("special", True)}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        config = path.with_name("tokenizer_config.json")
        config = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}

        def token_id(key: str, *fallbacks: str) -> int | None:
            name = config.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            return next((added[t] for t in ([name] if name else fallbacks) if t in added), None)

        return cls(model["vocab"], merges, added, _hf_pre_tokenizer(spec.get("pre_tokenizer"), path),
                   bos_id=token_id("bos_token", "<|begin_of_text|>", "<s>"),
                   eos_id=token_id("eos_token", "<|end_of_text|>", "<|endoftext|>", "</s>"),
                   pad_id=token_id("pad_token"), ignore_merges=bool(model.get("ignore_merges")),
                   control_tokens=control, chat_template=config.get("chat_template"))

    def save(self, directory: str | Path) -> None:
        """An HF ``tokenizer.json`` (loadable by the ``tokenizers`` library) plus ``tokenizer_config.json``.
        The pre-tokenizer is written as one regex Split per step followed by a regex-free ByteLevel."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        to_text = lambda b: "".join(B2U[x] for x in b)  # noqa: E731
        name = lambda i: next((t for t, j in self.special_tokens.items() if j == i), None)  # noqa: E731
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": t in self.control_tokens}
                             for t, i in sorted(self.special_tokens.items(), key=lambda x: x[1])],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
                  for p in self.patterns),
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self.ignore_merges,
                      "vocab": {to_text(b): i for b, i in sorted(self.encoder.items(), key=lambda x: x[1])},
                      "merges": [[to_text(a), to_text(b)] for (a, b), _ in
                                 sorted(self.merge_ranks.items(), key=lambda x: x[1])]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
                  "eos_token": name(self.eos_id), "pad_token": name(self.pad_id), "chat_template": self.chat_template}
        (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1),
                                                         encoding="utf-8")


def _hf_pre_tokenizer(spec: dict | None, path: Path) -> list[str]:
    """HF pre_tokenizer JSON -> our list of regexes applied in turn."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [p for sub in spec["pretokenizers"] for p in _hf_pre_tokenizer(sub, path)]
    if kind == "ByteLevel" and not spec.get("add_prefix_space"):
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        pattern = spec["pattern"]
        return [pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])]
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(spec)[:200]}")


# --------------------------------------------------------------------------------------------------------- loading


def tokenizer_from_gguf(reader) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (a ``gguf.GGUFReader`` or a path)."""
    if isinstance(reader, (str, Path)):
        import gguf

        reader = gguf.GGUFReader(reader)
    model = gguf_value(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        return ByteLevelBPETokenizer.from_gguf(reader)
    if model == "llama":
        tokenizer = SentencePieceTokenizer(model_proto=_sentencepiece_model_from_gguf(reader))
        tokenizer.chat_template = gguf_value(reader, "tokenizer.chat_template")
        return tokenizer
    raise ValueError(f"unsupported GGUF tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")


def _sentencepiece_model_from_gguf(reader) -> bytes:
    """Rebuild the SentencePiece ``tokenizer.model`` that llama.cpp's converter took apart: GGUF keeps every
    piece with its score and type (same numbering as SentencePiece), and Llama's normalizer is fixed - no
    Unicode normalization, spaces kept as '▁', a dummy prefix unless ``add_space_prefix`` is false."""
    get = lambda key, default=None: gguf_value(reader, key, default)  # noqa: E731
    if (tokens := get("tokenizer.ggml.tokens")) is None:
        raise ValueError("this GGUF file has no tokenizer.ggml.tokens; load the tokenizer from tokenizer.model")
    scores, types = get("tokenizer.ggml.scores") or [0.0] * len(tokens), get("tokenizer.ggml.token_type")
    types = types or [1] * len(tokens)
    unk = get("tokenizer.ggml.unknown_token_id", types.index(2) if 2 in types else None)
    special = (unk, *(get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")))
    ids = dict(zip((40, 41, 42, 43), special))
    trainer_spec = _protobuf(  # field numbers of sentencepiece_model.proto's TrainerSpec
        (3, 2), (4, len(tokens)), (35, 6 in types),  # model_type = BPE, vocab_size, byte_fallback if byte pieces
        *((f, -1 if i is None else i) for f, i in ids.items()),  # unk/bos/eos/pad ids, -1 = none
        *((f + 5, tokens[i]) for f, i in ids.items() if i is not None))  # ... and their pieces
    normalizer_spec = _protobuf((1, "identity"), (3, bool(get("tokenizer.ggml.add_space_prefix", True))),
                                (4, False), (5, True))  # name, add_dummy_prefix, remove_extra_ws, escape_ws
    pieces = (_protobuf((1, t), (2, float(s)), (3, ty)) for t, s, ty in zip(tokens, scores, types))
    return _protobuf(*((1, p) for p in pieces), (2, trainer_spec), (3, normalizer_spec))


def _protobuf(*fields: tuple[int, int | bool | float | str | bytes]) -> bytes:
    """Just enough of the protobuf wire format for a SentencePiece ModelProto: (field number, value) pairs,
    ints as varints (negative ones as 64-bit two's complement), floats as float32, str/bytes (and nested
    messages) length-prefixed."""

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    out = bytearray()
    for number, value in fields:
        if isinstance(value, float):
            out += varint(number << 3 | 5) + struct.pack("<f", value)
        elif isinstance(value, (str, bytes)):
            data = value.encode() if isinstance(value, str) else value
            out += varint(number << 3 | 2) + varint(len(data)) + data
        else:
            out += varint(number << 3) + varint(int(value))
    return bytes(out)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory. A SentencePiece ``tokenizer.model`` wins (HF's tokenizer.json
    for those models is a lossy conversion), then ``tokenizer.json``, then a tiktoken ``tokenizer.model``."""
    directory = Path(directory)
    model, hf = directory / "tokenizer.model", directory / "tokenizer.json"
    if not model.is_file() and not hf.is_file():
        raise ValueError(f"{directory}: no tokenizer.json or tokenizer.model found; copy the tokenizer files of "
                         "the original checkpoint into this directory")
    if model.is_file():
        if not regex.match(rb"[A-Za-z0-9+/=]+ \d+\r?\n", model.read_bytes()[:200]):  # tiktoken: "base64 rank"
            return SentencePieceTokenizer(model)
        if not hf.is_file():
            names = directory / "tiktoken_special_tokens.json"
            return TiktokenBPETokenizer(model, json.loads(names.read_text()) if names.is_file() else None)
    return ByteLevelBPETokenizer.from_tokenizer_json(hf)


# ------------------------------------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Decodes a stream of token ids into text pieces without ever emitting half a character: an emoji may
    arrive as four byte tokens, and printing each alone would show four U+FFFD. An incremental UTF-8 decoder
    holds incomplete sequences back until they complete; ``flush()`` releases whatever is left.

    SentencePiece drops the dummy-prefix space only at the start of the text, so until the first character
    appears, the ids seen so far are decoded together as a text start; after that each id as a continuation.
    Joining all pushes and the flush gives exactly ``tokenizer.decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._head: list[int] | None = []  # ids while nothing has been produced yet; None afterwards

    def push(self, token_id: int) -> str:
        if self._head is None:
            data = self.tokenizer.decode_bytes([token_id], at_start=False)
        else:
            self._head.append(int(token_id))
            data = self.tokenizer.decode_bytes(self._head)
            if data:
                self._head = None
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
