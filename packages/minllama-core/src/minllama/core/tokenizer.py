"""Tokenizers: text <-> token ids for the three vocabulary formats Llama-family checkpoints ship with.

This module is the front door: ``load_tokenizer`` (a checkpoint directory) and ``tokenizer_from_gguf`` pick the
right class, and every tokenizer name is importable from here. The code itself is split by what it teaches:

* ``tokenizer_base.py`` - the ``Tokenizer`` interface every format implements, and ``StreamDecoder``, which
  decodes a stream of ids without printing half a character;
* ``bpe.py`` - byte-pair encoding, the algorithm of Llama 3 and SmolLM2, in plain Python;
* ``bpe_files.py`` - where BPE vocabularies come from: ``TiktokenBPETokenizer`` (Llama 3's ``tokenizer.model``,
  ``base64(bytes) rank`` per line) and ``ByteLevelBPETokenizer`` (GPT-2 style, from an HF ``tokenizer.json`` or a
  GGUF file: SmolLM2, Llama 3 in HF format), with their readers and writers;
* ``sentencepiece_tokenizer.py`` - ``SentencePieceTokenizer`` (Llama 1/2, TinyLlama): the ``sentencepiece``
  library encodes, we add Llama's conventions (BOS/EOS, byte fallback, the dummy-prefix space);
* ``sentencepiece_proto.py`` - writing a SentencePiece ``tokenizer.model`` (protobuf), e.g. rebuilt from GGUF.
"""
from __future__ import annotations

import json
from pathlib import Path

import regex

from .bpe import GPT2_PATTERN, LLAMA3_PATTERN, BytePairEncoder
from .bpe_files import (B2U, GGUF_CONTROL, GGUF_PRE_TOKENIZERS, GGUF_USER_DEFINED, LLAMA3_SPECIAL_TOKENS, U2B,
                        ByteLevelBPETokenizer, TiktokenBPETokenizer)
from .formats import gguf_field as gguf_value  # one reader of GGUF metadata for the weights and the tokenizer
from .sentencepiece_proto import sentencepiece_model_from_gguf
from .sentencepiece_tokenizer import SentencePieceTokenizer
from .tokenizer_base import STOP_TOKENS, StreamDecoder, Tokenizer

__all__ = ["B2U", "GGUF_CONTROL", "GGUF_PRE_TOKENIZERS", "GGUF_USER_DEFINED", "GPT2_PATTERN", "LLAMA3_PATTERN",
           "LLAMA3_SPECIAL_TOKENS", "STOP_TOKENS", "U2B", "BytePairEncoder", "ByteLevelBPETokenizer",
           "SentencePieceTokenizer", "StreamDecoder", "TiktokenBPETokenizer", "Tokenizer", "gguf_value",
           "load_tokenizer", "tokenizer_from_gguf"]


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


def tokenizer_from_gguf(reader) -> Tokenizer:
    """The tokenizer embedded in a GGUF file (a path, a ``gguf_file.GGUFFile`` or a ``gguf.GGUFReader``)."""
    if isinstance(reader, (str, Path)):
        from .gguf_file import GGUFFile

        reader = GGUFFile(reader)
    model = gguf_value(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        return ByteLevelBPETokenizer.from_gguf(reader)
    if model == "llama":
        tokenizer = SentencePieceTokenizer(model_proto=sentencepiece_model_from_gguf(reader))
        tokenizer.chat_template = gguf_value(reader, "tokenizer.chat_template")
        return tokenizer
    raise ValueError(f"unsupported GGUF tokenizer.ggml.model {model!r} (supported: 'gpt2', 'llama')")
