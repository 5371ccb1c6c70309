"""BPE vocabularies as checkpoints store them: Meta's tiktoken file, HF's tokenizer.json, GGUF metadata.

The algorithm is in ``bpe.py``; this file only answers "where do the tokens, ranks and special tokens come from,
and how are they written back". Two formats, one class each:

* ``TiktokenBPETokenizer`` - Llama 3's ``tokenizer.model``: one ``base64(token bytes) rank`` per line. The rank is
  the id *and* the merge priority. The 256 special tokens are not in the file: their ids follow the last rank,
  in an order fixed by Meta's code (``LLAMA3_SPECIAL_TOKENS``).
* ``ByteLevelBPETokenizer`` - GPT-2 style (SmolLM2; Llama 3 converted to HF): a vocabulary of tokens stored as
  *text*, an explicit merge list "left right" in priority order, and "added tokens" matched as whole strings.
  Text files cannot hold raw bytes, so each byte is drawn as a printable character (``B2U``): ' ' is 'Ġ'.

The pre-tokenizer is stored differently too: tokenizer.json spells out its steps as JSON (``_hf_pre_tokenizer``
turns them into our list of regexes), GGUF only names it (``GGUF_PRE_TOKENIZERS`` maps llama.cpp's names).
"""
from __future__ import annotations

import base64
import json
from array import array
from pathlib import Path
from typing import Iterable

import regex

from .bpe import GPT2_PATTERN, LLAMA3_PATTERN, BytePairEncoder
from .formats import gguf_field as gguf_value  # one reader of GGUF metadata for the weights and the tokenizer

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
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of tokens matched as whole strings


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: byte-level vocab files store tokens as text, so
    each of the 256 bytes is drawn as a visible character (printable Latin-1 as itself, the rest - controls,
    space (-> 'Ġ'), DEL... - as chr(256 + n) in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


B2U = _bytes_to_unicode()  # byte (0..255) -> the character that stands for it in vocab files
U2B = {c: b for b, c in B2U.items()}


class TiktokenBPETokenizer(BytePairEncoder):
    """Llama 3's ``tokenizer.model``: each line ``base64(token bytes) rank``; the rank is also the token id and
    the merge priority (a pair merges if its concatenation is a token, lowest rank first). The special tokens
    are appended after the last rank, in Meta's order (``LLAMA3_SPECIAL_TOKENS`` unless given)."""

    family = "llama3"
    ignore_merges = True

    def __init__(self, model_path: str | Path, special_tokens: list[str] | None = None):
        self.path, ranks = Path(model_path), {}  # ranks: token bytes -> rank (= id)
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


class ByteLevelBPETokenizer(BytePairEncoder):
    """GPT-2 style byte-level BPE (SmolLM2, Llama 3 from HF). Vocab files write each token's bytes through
    ``B2U`` and list merges "left right" in priority order; special/added tokens are stored as plain text and
    matched as whole strings (HF's per-token lstrip/rstrip/single_word flags are not supported - the Llama
    family and SmolLM2 do not use them)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: dict[str, int],
                 patterns: list[str], bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, ignore_merges: bool = False, control_tokens: set[str] | None = None,
                 chat_template: str | None = None):
        to_bytes = lambda t: bytes(U2B[c] for c in t)  # noqa: E731
        as_bytes = {t: to_bytes(t) for t in vocab if all(c in U2B for c in t)}  # each token's text, converted once
        self._setup({b: vocab[t] for t, b in as_bytes.items()}, added_tokens, patterns)
        self.set_merges((as_bytes.get(a) or to_bytes(a), as_bytes.get(b) or to_bytes(b)) for a, b in merges)
        self.ignore_merges, self.bos_id, self.eos_id, self.pad_id = ignore_merges, bos_id, eos_id, pad_id
        self.control_tokens = set(added_tokens) if control_tokens is None else set(control_tokens)
        self.chat_template = chat_template
        self.family = "llama3" if "<|start_header_id|>" in added_tokens else "chatml"

    def set_merges(self, merges: Iterable[tuple[bytes, bytes]]) -> None:
        """The merge list, in priority order (the position is the rank), stored by the token each merge makes.

        BPE training creates each token with one merge, so "left + right merges with rank r" fits in two numbers
        at the made token's id: r, and the length of its left part (``left + right`` is the token; the length
        says where it splits). A pair is a merge if the token it spells was made by splitting it there. Two
        int arrays of the vocabulary's length instead of a dict of 49k pairs of bytes: 0.4 MB instead of 6.5
        for SmolLM2. A file may list more ways of making a token (Llama 3's tokenizer.json does): those extra
        pairs go in a small dict. As in HF's ``tokenizers``, every merge must make a token of the vocabulary."""
        self._merge_rank = array("i", [-1]) * len(self.decoder)  # token id -> rank of the merge that makes it
        self._merge_split = array("i", [0]) * len(self.decoder)  # token id -> length of that merge's left part
        self._extra_merges: dict[tuple[bytes, bytes], int] = {}
        for rank, (left, right) in enumerate(merges):
            token = self.encoder.get(left + right)
            if token is None:
                raise ValueError(f"the merge {left!r} + {right!r} makes a token that is not in the vocabulary")
            if self._merge_rank[token] < 0 or self._merge_split[token] == len(left):
                self._merge_rank[token], self._merge_split[token] = rank, len(left)
            else:
                self._extra_merges[left, right] = rank

    @property
    def merge_ranks(self) -> dict[tuple[bytes, bytes], int]:
        """Every merge as (left bytes, right bytes) -> rank: a dict built when asked (saving, extending)."""
        token = {i: b for b, i in self.encoder.items()}  # the vocabulary's bytes (an added token may share an id)
        return {(token[t][:k], token[t][k:]): r
                for t, (r, k) in enumerate(zip(self._merge_rank, self._merge_split)) if r >= 0} | self._extra_merges

    def _rank(self, left: bytes, right: bytes) -> int | None:
        token = self.encoder.get(left + right)
        if token is None:
            return None
        if self._merge_split[token] == len(left):  # 0 for a token no merge makes: a part is never empty
            return self._merge_rank[token]
        return self._extra_merges.get((left, right))

    @classmethod
    def from_gguf(cls, reader) -> ByteLevelBPETokenizer:
        """From the ``tokenizer.ggml.*`` metadata of a GGUF file written by llama.cpp's converter."""
        get = lambda key, default=None: gguf_value(reader, key, default)  # noqa: E731
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        if tokens is None or get("tokenizer.ggml.model") != "gpt2":
            raise ValueError("this GGUF file has no byte-level BPE (tokenizer.ggml.model = 'gpt2') vocabulary")
        tokens = list(tokens)  # decoded from the file once (the reader decodes its string arrays when read)
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
