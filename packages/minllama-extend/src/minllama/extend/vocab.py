"""A larger vocabulary: new tokens for a new language or domain, with the old ones untouched.

Three steps, each kept apart so it can be checked on its own:

1. **Tokenizer.** New tokens are *appended*: every old id keeps its meaning, so the old embedding rows stay valid.
   - SentencePiece (Llama 1/2): train a small SentencePiece model on the new text and append its pieces that the
     old model lacks (``merge_sentencepiece``); this is how Chinese-LLaMA added Chinese to Llama.
   - Byte-level BPE (SmolLM2, Llama 3): continue BPE training on the new text, starting from the old
     tokenization (``extend_bpe``): each new token is one new merge ranked after every old one, so old merges
     still apply first and the new ones only join what the old tokenizer left in pieces.
2. **Model.** ``resize_vocab`` grows the embedding and the output head. A new token starts as the *mean of the
   embeddings of the old pieces it replaces* (the pieces the old tokenizer splits its text into): the model
   already knows what that sequence means, so the new token starts close to it instead of at random.
3. **Training.** ``train_only_new_rows`` freezes the rest of the model and masks the gradient of the old rows, so
   finetuning teaches the new tokens without changing anything the model computes on old-token inputs.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from minllama.core.model import MinimalLlama
from minllama.core.sentencepiece_proto import model_proto_piece
from minllama.core.tokenizer import ByteLevelBPETokenizer, SentencePieceTokenizer


def tokens_per_char(tokenizer, texts: Iterable[str]) -> float:
    """Tokens per character of ``texts``: what a text costs in sequence length (and attention, which grows with
    its square). Per character, not per word, so that languages and scripts compare; note that a character is a
    letter in Russian or Persian but a whole syllable in Korean or Chinese."""
    texts = list(texts)
    chars = sum(map(len, texts))
    if chars == 0:
        raise ValueError("tokens_per_char needs some text: the texts given are empty")
    return sum(len(tokenizer.encode(t)) for t in texts) / chars


# --------------------------------------------------------------------------------------------- SentencePiece
def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe", **options) -> bytes:
    """Train a SentencePiece model on ``texts`` in memory; returns its serialized ModelProto."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=out, vocab_size=vocab_size,
                                   model_type=model_type, minloglevel=2, **options)
    return out.getvalue()


def merge_sentencepiece(base_proto: bytes, extra_proto: bytes, rank_after_old: bool = True) -> tuple[bytes, list[str]]:
    """Append the NORMAL pieces of ``extra_proto`` that ``base_proto`` lacks.

    Returns (merged serialized model, the added pieces in id order). Protobuf concatenates repeated fields that
    appear later in a message, so appending serialized ``pieces`` entries (core's ``model_proto_piece``) *is*
    appending to the list: no protobuf library is needed (``sentencepiece_model_pb2`` needs the ``protobuf``
    package, which this project does not install). Old pieces keep their ids and scores; new ones come after
    the last old id.

    Scores decide the order of merges in a BPE model (Llama 1/2): the highest-scoring piece that two neighbours
    form is merged first. With ``rank_after_old`` the new pieces keep their own order but score below every old
    piece, so every old merge still happens first, exactly as before, and the new ones only join what is left:
    text the old model handled can only get shorter (the same rule as ``extend_bpe``'s merges). With the extra
    model's own scores, a new piece can win a merge an old one used to win and re-segment old text, either way
    (measured on English: +0.02% tokens with 685 Korean pieces). For a unigram base model, whose scores are
    log-probabilities, pass ``rank_after_old=False``.
    """
    import sentencepiece as spm

    base, extra = (spm.SentencePieceProcessor(model_proto=p) for p in (base_proto, extra_proto))
    known = {base.id_to_piece(i) for i in range(base.get_piece_size())}
    added = []
    for i in range(extra.get_piece_size()):
        piece = extra.id_to_piece(i)
        if piece in known or extra.is_control(i) or extra.is_unknown(i) or extra.is_byte(i) or extra.is_unused(i):
            continue
        added.append((piece, extra.get_score(i)))
        known.add(piece)
    if rank_after_old and added:
        shift = max(sc for _, sc in added) - min(base.get_score(i) for i in range(base.get_piece_size())) + 1.0
        added = [(p, sc - shift) for p, sc in added]  # the best new piece scores 1 below the worst old one
    merged = base_proto + b"".join(model_proto_piece(p, s) for p, s in added)
    return merged, [p for p, _ in added]


def extend_sentencepiece(tokenizer: SentencePieceTokenizer, texts: Iterable[str], vocab_size: int,
                         rank_after_old: bool = True, **options) -> tuple[SentencePieceTokenizer, list[list[int]]]:
    """Train a SentencePiece model of ``vocab_size`` on ``texts`` (``options``: the trainer's), merge its new pieces
    into ``tokenizer`` (``rank_after_old``: see ``merge_sentencepiece``).

    Returns (extended tokenizer, for every new id the old ids its text encodes to): the second list is what
    ``resize_vocab`` averages to initialize the new embedding rows."""
    texts = list(texts)
    merged, added = merge_sentencepiece(tokenizer.sp.serialized_model_proto(),
                                        train_sentencepiece(texts, vocab_size, **options), rank_after_old)
    return SentencePieceTokenizer(model_proto=merged), [_old_ids_of_piece(tokenizer, p) for p in added]


def _old_ids_of_piece(tokenizer: SentencePieceTokenizer, piece: str) -> list[int]:
    """The old ids that spell ``piece``: encode its surface text; a word-initial piece (▁x) keeps its ▁ through
    the dummy prefix, a word-internal one drops the ▁ the dummy prefix would add."""
    sp = tokenizer.sp
    if piece.startswith("▁"):
        return sp.encode(piece[1:].replace("▁", " "))
    ids = sp.encode(piece.replace("▁", " "))
    if ids and sp.id_to_piece(ids[0]) == "▁":  # a lone dummy-prefix piece
        ids = ids[1:]
    elif ids and sp.id_to_piece(ids[0]).startswith("▁"):  # "▁ab": use the same piece without its ▁ if it exists
        bare = sp.piece_to_id(sp.id_to_piece(ids[0])[1:])
        ids = ([bare] if bare != sp.unk_id() else ids[:1]) + ids[1:]
    return ids


# --------------------------------------------------------------------------------------------- byte-level BPE
def extend_bpe(tokenizer: ByteLevelBPETokenizer, texts: Iterable[str], n_new: int,
               min_count: int = 2) -> tuple[ByteLevelBPETokenizer, list[list[int]]]:
    """Continue byte-level BPE training on ``texts`` for up to ``n_new`` merges.

    Each word of the new text starts as its old tokenization; the most frequent adjacent pair (of at least
    ``min_count`` occurrences, whose joined bytes are not a token yet) becomes a new token and a new merge ranked
    after all old ones. Returns (extended tokenizer, for every new id the old ids it replaces).
    """
    words = Counter(w for text in texts for w in tokenizer.pre_tokenize(text))
    segs = {w: [tokenizer.decoder[i] for i in tokenizer._encode_word(w)] for w in words}  # word -> list of bytes
    new_tokens: list[bytes] = []
    new_merges: list[tuple[bytes, bytes]] = []
    for _ in range(n_new):
        pairs: Counter = Counter()
        for w, parts in segs.items():
            for a, b in zip(parts, parts[1:]):
                if a + b not in tokenizer.encoder:
                    pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # most frequent, ties deterministic
        if count < min_count:
            break
        new_tokens.append(a + b)
        new_merges.append((a, b))
        for w, parts in segs.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            segs[w] = out
    first = tokenizer.vocab_size
    ext = copy.copy(tokenizer)
    encoder = dict(tokenizer.encoder) | {t: first + j for j, t in enumerate(new_tokens)}
    ext._setup(encoder, tokenizer.special_tokens, tokenizer.patterns)
    old_merges = tokenizer.merge_ranks
    ext.set_merges([*sorted(old_merges, key=old_merges.get), *new_merges])  # the new merges rank after the old
    replaced = [[tokenizer.encoder[p] for p in tokenizer._merge(t)] for t in new_tokens]
    return ext, replaced


# --------------------------------------------------------------------------------------------- the model
@torch.no_grad()
def resize_vocab(model: MinimalLlama, replaced: Sequence[Sequence[int]]) -> MinimalLlama:
    """Append ``len(replaced)`` rows to the embedding and the output head (in place; returns the model).

    New row j = the mean of the old rows ``replaced[j]`` (the old pieces the new token stands for) in the
    embedding, and likewise in an untied head; a tied head shares the new embedding. Old rows are copied
    unchanged, so old-token inputs give bit-identical old logits (the new logits are extra columns)."""
    if any(len(r) == 0 for r in replaced):
        raise ValueError("every new token needs at least one old piece to initialize from")
    old_n = model.tok_embeddings.num_embeddings
    if any(i >= old_n or i < 0 for r in replaced for i in r):
        raise ValueError(f"the pieces to average must be old ids (< {old_n})")
    cfg = model.config
    new_n = old_n + len(replaced)

    def grown(weight: torch.Tensor) -> torch.Tensor:
        rows = [weight[list(r)].float().mean(0).to(weight.dtype) for r in replaced]
        return torch.cat([weight, torch.stack(rows)]) if rows else weight.clone()

    emb = nn.Embedding(new_n, cfg.dim, device=model.tok_embeddings.weight.device,
                       dtype=model.tok_embeddings.weight.dtype)
    emb.weight.copy_(grown(model.tok_embeddings.weight))
    head = nn.Linear(cfg.dim, new_n, bias=False, device=emb.weight.device, dtype=model.output.weight.dtype)
    if cfg.tie_embeddings:
        head.weight = emb.weight
    else:
        head.weight.copy_(grown(model.output.weight))
    model.tok_embeddings, model.output = emb, head
    model.config = dataclasses.replace(cfg, vocab_size=new_n)
    return model


def train_only_new_rows(model: MinimalLlama, n_old: int) -> list:
    """Make only rows >= ``n_old`` of the embedding and head trainable: every other parameter is frozen, and a
    gradient hook zeroes the old rows' gradient. Returns the hook handles (``.remove()`` them to undo).

    Use an optimizer without weight decay on these tensors (decay would move the old rows with a zero gradient)."""
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    weights = {id(w): w for w in (model.tok_embeddings.weight, model.output.weight)}.values()  # a tied head: once
    for w in weights:
        w.requires_grad_(True)
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        keep[n_old:] = 1
        handles.append(w.register_hook(lambda g, keep=keep: g * keep))
    return handles
