"""Writing a SentencePiece ``tokenizer.model`` without the protobuf library: the wire format, and a model from GGUF.

A ``tokenizer.model`` is a serialized protobuf message (``ModelProto`` in sentencepiece_model.proto): a repeated
field of pieces (text, score, type), a ``TrainerSpec`` (model type, special-token ids...) and a
``NormalizerSpec`` (how text is normalized before encoding). We need to *write* such files twice - to rebuild
the model a GGUF file took apart (below), and to append pieces to a model (``minllama.extend.vocab``) - and the
wire format is simple enough that ``protobuf_message`` writes it in 20 lines, so the project does not depend on
the ``protobuf`` package. Reading stays with the ``sentencepiece`` library.

The wire format is a flat list of (field number, value) records, each prefixed by ``number << 3 | wire type``:
integers as *varints* (7 bits per byte, low bits first, the high bit says "more follows"), float32 as 4 bytes
little-endian, and strings, bytes and nested messages as a varint length followed by the data. A repeated field
is just the same record again, which is why appending records appends to a list.
"""
from __future__ import annotations

import struct

from .formats import gguf_field as gguf_value

NORMAL = 1  # SentencePiece piece types (GGUF's tokenizer.ggml.token_type uses the same numbers)


def protobuf_message(*fields: tuple[int, int | bool | float | str | bytes]) -> bytes:
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
            out += varint(number << 3 | 5) + struct.pack("<f", value)  # wire type 5: 32-bit
        elif isinstance(value, (str, bytes)):
            data = value.encode() if isinstance(value, str) else value
            out += varint(number << 3 | 2) + varint(len(data)) + data  # wire type 2: length-delimited
        else:
            out += varint(number << 3) + varint(int(value))  # wire type 0: varint (also bools and enums)
    return bytes(out)


def model_proto_piece(piece: str, score: float, kind: int = NORMAL) -> bytes:
    """One entry of ``ModelProto.pieces`` (field 1), ready to be concatenated to a serialized model: a nested
    ``SentencePiece`` message {1: piece, 2: score (float32), 3: type}."""
    return protobuf_message((1, protobuf_message((1, piece), (2, float(score)), (3, kind))))


def sentencepiece_model_from_gguf(reader) -> bytes:
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
    trainer_spec = protobuf_message(  # field numbers of sentencepiece_model.proto's TrainerSpec
        (3, 2), (4, len(tokens)), (35, 6 in types),  # model_type = BPE, vocab_size, byte_fallback if byte pieces
        *((f, -1 if i is None else i) for f, i in ids.items()),  # unk/bos/eos/pad ids, -1 = none
        *((f + 5, tokens[i]) for f, i in ids.items() if i is not None))  # ... and their pieces
    normalizer_spec = protobuf_message((1, "identity"), (3, bool(get("tokenizer.ggml.add_space_prefix", True))),
                                       (4, False), (5, True))  # name, add_dummy_prefix, remove_extra_ws, escape_ws
    pieces = b"".join(model_proto_piece(t, s, ty) for t, s, ty in zip(tokens, scores, types))
    return pieces + protobuf_message((2, trainer_spec), (3, normalizer_spec))
