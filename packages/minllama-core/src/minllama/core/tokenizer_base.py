"""What every tokenizer offers, whatever its vocabulary format: the ``Tokenizer`` interface and ``StreamDecoder``.

A tokenizer is two maps: text -> list of ids (``encode``) and ids -> text (``decode``). The second one is really
ids -> *bytes* (``decode_bytes``): a token may hold half of a UTF-8 character (an emoji is 4 bytes, and can be 4
tokens), so only whole texts can be turned into ``str`` safely. ``StreamDecoder`` is the piece that turns bytes
into text while tokens still arrive one by one.

The rest of MinimalLlama (generation, chat formats, checkpoints) only talks to this interface; the three formats
implementing it are in ``sentencepiece_tokenizer.py`` (Llama 1/2) and ``bpe.py`` + ``bpe_files.py`` (Llama 3,
SmolLM2).
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterable

# Tokens that end an assistant turn (or the whole document) in the chat formats we know.
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")


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
