"""Byte-pair encoding (BPE): how Llama 3, SmolLM2 and GPT-2 turn text into token ids, in plain Python.

A BPE vocabulary is a set of byte strings with ids, plus a *rank* that says which adjacent pair to join first.
Training learned the merges greedily, most frequent pair first; encoding replays them in the same order, so a
text is split the way the model saw such text during training. Encoding one text takes three steps:

1. **Special tokens first.** ``<|eot_id|>``, ``<|im_end|>``... are cut out of the text and emitted as their own
   ids, so ordinary text can never be merged into or across them (``allow_special=False`` skips this step: the
   string ``"<|eot_id|>"`` typed by a user is then just text).
2. **Pre-tokenize.** One or more regexes split the rest into "words": runs of letters, short runs of digits,
   punctuation, whitespace. Merges never cross a word boundary, so a word tokenizes the same wherever it occurs
   (and can be cached). Models differ most in this step: ``GPT2_PATTERN``, ``LLAMA3_PATTERN``, and SmolLM2
   isolates every digit before applying GPT-2's pattern.
3. **Merge.** Inside a word, start from single bytes and repeatedly join the adjacent pair of best (lowest) rank,
   until no adjacent pair has a rank. Two ways of ranking a pair are in use:

   - tiktoken (Llama 3): a pair's rank is the rank of the joined token ``left + right``; in this format the rank
     is also the token's id (``TiktokenBPETokenizer``);
   - GPT-2 merge lists (tokenizer.json, GGUF): a pair's rank is its position in an explicit list of merges
     (``ByteLevelBPETokenizer``).

Decoding is concatenating the bytes of each id. Those bytes can end in the middle of a UTF-8 character, hence
``decode_bytes`` (see ``tokenizer_base.StreamDecoder``).

``BytePairEncoder`` below is steps 1-3 and decoding; where a vocabulary comes from (a tiktoken file,
tokenizer.json, GGUF metadata) and which rank rule applies is the business of its two subclasses in
``bpe_files.py``.
"""
from __future__ import annotations

from typing import Iterable

import regex

from .tokenizer_base import Tokenizer

# The GPT-2 pre-tokenizer (also HF's ByteLevel(use_regex=True)): contractions, letters, numbers, other symbols
# (each optionally after one space), and whitespace runs that leave their last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3 (Meta's tokenizer.py): case-insensitive contractions, numbers in groups of at most 3 digits, and
# newlines kept apart from other whitespace.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


class BytePairEncoder(Tokenizer):
    """Pre-tokenization + rank-based merging over bytes, shared by the tiktoken and GPT-2 formats.
    Subclasses call ``_setup`` with the vocabulary and define ``_rank`` (which pair merges first)."""

    ignore_merges = False  # if a whole word is a token, take it without merging (tiktoken; HF `ignore_merges`)

    def _setup(self, encoder: dict[bytes, int], special_tokens: dict[str, int], patterns: list[str]):
        """``encoder``: token bytes -> id; ``special_tokens``: whole strings -> id; ``patterns``: the
        pre-tokenizer regexes, applied one after the other."""
        self.encoder, self.special_tokens, self.patterns = encoder, dict(special_tokens), list(patterns)
        # id -> bytes as a list (ids are dense: a list is a seventh of a dict's size); None for an unused id
        ids = {i: b for b, i in encoder.items()} | {i: t.encode() for t, i in self.special_tokens.items()}
        if ids and not 0 <= min(ids) <= max(ids) < 2 * len(ids) + 1024:  # a damaged file, before a huge list
            raise ValueError(f"token ids run from {min(ids)} to {max(ids)} for {len(ids)} tokens: ids must be "
                             "0, 1, 2, ... (with few gaps)")
        self.decoder: list[bytes | None] = [None] * (max(ids, default=-1) + 1)
        for i, b in ids.items():
            self.decoder[i] = b
        self._regexes = [regex.compile(p) for p in self.patterns]
        # Longest first, so that of two specials starting at the same place the longer one wins.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = regex.compile("|".join(map(regex.escape, alternatives))) if alternatives else None
        self._cache: dict[str, list[int]] = {}  # word -> its ids

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def _rank(self, left: bytes, right: bytes) -> int | None:
        """Priority of joining ``left`` and ``right`` (lower merges first); None if they never merge."""
        raise NotImplementedError

    # step 1: special tokens
    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        ids, start = [], 0
        matches = self._special_re.finditer(text) if allow_special and self._special_re else ()
        for m in [*matches, None]:  # None: the text after the last special token
            for word in self.pre_tokenize(text[start:m.start() if m else len(text)]):
                ids += self._encode_word(word)
            if m:
                ids.append(self.special_tokens[m.group()])
                start = m.end()
        return ids

    # step 2: words
    def pre_tokenize(self, text: str) -> list[str]:
        """Split into words with each regex in turn; text between matches is kept as words too (HF's
        "Isolated" behaviour), so nothing is ever lost: ``"".join(pre_tokenize(t)) == t``."""
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

    # step 3: merges inside a word
    def _encode_word(self, word: str) -> list[int]:
        if (ids := self._cache.get(word)) is None:
            data = word.encode()  # UTF-8: BPE works on bytes, so every text is representable
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
        parts = [data[i:i + 1] for i in range(len(data)) if data[i:i + 1] in self.encoder]  # list[bytes], 1 each

        def rank(i: int) -> float:  # rank of the pair (parts[i], parts[i + 1]); inf: it never merges
            r = self._rank(parts[i], parts[i + 1])
            return float("inf") if r is None else r

        ranks = [rank(i) for i in range(len(parts) - 1)]  # len(parts) - 1 entries: one per adjacent pair
        while ranks and (best := min(ranks)) != float("inf"):
            i = ranks.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank(i - 1)
            if i < len(ranks):
                ranks[i] = rank(i)
        return parts

    # decoding
    def decode_bytes(self, ids: Iterable[int], at_start: bool = True) -> bytes:
        ids = [int(i) for i in ids]
        parts = [self.decoder[i] if 0 <= i < len(self.decoder) else None for i in ids]
        if None in parts:
            unknown = ids[parts.index(None)]
            raise ValueError(f"token id {unknown} is not in the vocabulary (size {self.vocab_size})")
        return b"".join(parts)
