"""SentencePiece, as Llama 1/2 and TinyLlama use it: what the ``sentencepiece`` library does, and what we add.

The library encodes (BPE or unigram over Unicode characters, driven by the scores stored with each piece); we do
not re-implement that. What a Llama needs on top are three conventions, all about spaces and bytes:

* **'▁' is a space.** SentencePiece treats the text as one stream and marks word boundaries with '▁' (U+2581)
  inside pieces: " world" is the piece "▁world". Decoding turns '▁' back into ' '.
* **The dummy prefix.** With ``add_dummy_prefix`` the model pretends every text starts with a space, so "Hi" at
  the start of a text is the same piece "▁Hi" as in the middle. Decoding must drop that one invented space again,
  but only for the first piece of a *text*: a streaming decoder that decodes token by token would otherwise
  drop the space of every word (hence ``decode_bytes(..., at_start=False)``).
* **Byte fallback.** A character missing from the vocabulary is spelled as its UTF-8 bytes, pieces ``<0xNN>``;
  those decode as raw bytes, which may be half a character until the next ones arrive.

Control tokens (``<s>``, ``</s>``) have no text at all: ``"<s>"`` in a text is four characters, never BOS.
The ``tokenizer.model`` file is a protobuf; ``sentencepiece_proto.py`` writes one (e.g. rebuilt from GGUF).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .tokenizer_base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model`` (a file, or its serialized bytes as ``model_proto``) behind the
    ``Tokenizer`` interface, with the three conventions above: '▁' as space, the dummy prefix dropped only at the
    start of a text, byte pieces ``<0xNN>`` decoded as raw bytes."""

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
        # The surface bytes of every piece (list[bytes], indexed by id); control tokens (<s>, </s>) have none,
        # as in sp.decode.
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
