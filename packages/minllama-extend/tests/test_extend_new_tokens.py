"""Vocabulary extension: old ids and old logits unchanged (bit-exact), new tokens encode and decode (checked with
sentencepiece's own parser and with HF tokenizers loading the saved tokenizer.json), initialization = mean of the
replaced pieces, and only the new rows learn."""
import pytest
import torch
import torch.nn.functional as F

from extend_helpers import ENGLISH, byte_bpe_tokenizer, new_language, tiny_model
from minllama.core.checkpoint import load_pretrained, save_hf
from minllama.core.tokenizer import SentencePieceTokenizer
from minllama.extend.vocab import (extend_bpe, extend_sentencepiece, merge_sentencepiece, resize_vocab,
                                   train_only_new_rows, train_sentencepiece)

NEW = new_language(300)
HELD_OUT = new_language(20, seed=1)


@pytest.fixture(scope="module")
def bpe():
    old = byte_bpe_tokenizer()
    new, replaced = extend_bpe(old, NEW, n_new=60)
    return old, new, replaced


@pytest.fixture(scope="module")
def sp():
    old = SentencePieceTokenizer(model_proto=train_sentencepiece(ENGLISH * 20, 300, character_coverage=1.0,
                                                                 byte_fallback=True))
    new, replaced = extend_sentencepiece(old, NEW, 80, character_coverage=1.0)
    return old, new, replaced


def test_bpe_extension_appends_tokens_and_shortens_the_new_text(bpe):
    old, new, replaced = bpe
    assert new.vocab_size == old.vocab_size + 60 == 256 + len(replaced)
    assert all(new.encoder[b] == i for b, i in old.encoder.items())  # every old id keeps its bytes
    for text in HELD_OUT + ENGLISH:
        ids = new.encode(text)
        assert new.decode(ids) == text
    short, long_ = sum(len(new.encode(t)) for t in HELD_OUT), sum(len(old.encode(t)) for t in HELD_OUT)
    assert short < 0.6 * long_
    for j, pieces in enumerate(replaced):  # a new token is exactly the bytes of the old pieces it replaces
        assert new.decoder[256 + j] == b"".join(old.decoder[i] for i in pieces) and len(pieces) >= 2


def test_bpe_extension_loads_in_hf_tokenizers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    old, new, _ = bpe
    new.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in HELD_OUT + ENGLISH:
        assert hf.encode(text, add_special_tokens=False) == new.encode(text)


def test_sentencepiece_merge_keeps_old_pieces_and_adds_new_ones(sp):
    import sentencepiece as spm

    old, new, replaced = sp
    assert new.vocab_size == old.vocab_size + len(replaced) and len(replaced) > 20
    a, b = old.sp, new.sp
    for i in range(a.get_piece_size()):
        assert (a.id_to_piece(i), a.get_score(i), a.is_byte(i), a.is_control(i)) == \
               (b.id_to_piece(i), b.get_score(i), b.is_byte(i), b.is_control(i))
    # sentencepiece parses the appended pieces as ordinary pieces (the independent protobuf reader)
    reread = spm.SentencePieceProcessor(model_proto=new.sp.serialized_model_proto())
    added = [reread.id_to_piece(i) for i in range(old.vocab_size, new.vocab_size)]
    assert all(not reread.is_control(i) and not reread.is_byte(i) for i in range(old.vocab_size, new.vocab_size))
    for text in HELD_OUT:
        ids = new.encode(text)
        assert new.decode(ids) == text and any(i >= old.vocab_size for i in ids)
    assert sum(len(new.encode(t)) for t in HELD_OUT) < 0.7 * sum(len(old.encode(t)) for t in HELD_OUT)
    for piece, pieces in zip(added, replaced):  # the old pieces spell the new piece (▁ = a space)
        assert "".join(old.sp.id_to_piece(i) for i in pieces).lstrip("▁") == piece.lstrip("▁")
    merged_again, none_added = merge_sentencepiece(new.sp.serialized_model_proto(),
                                                   new.sp.serialized_model_proto())
    assert none_added == [] and merged_again == new.sp.serialized_model_proto()


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mqa"])  # untied and tied head
def test_resized_model_keeps_old_logits_bit_exact(name, bpe):
    old_tok, _, replaced = bpe
    model = tiny_model(name)
    tokens = torch.tensor([old_tok.encode(HELD_OUT[0] + " " + ENGLISH[0])])
    before = model(tokens)
    old_emb, old_head = model.tok_embeddings.weight.clone(), model.output.weight.clone()
    resize_vocab(model, replaced)
    after = model(tokens)
    assert after.shape[-1] == 256 + len(replaced) and model.config.vocab_size == 256 + len(replaced)
    assert torch.equal(after[..., :256], before)
    for j, pieces in enumerate(replaced):  # mean of the replaced pieces' rows
        assert torch.equal(model.tok_embeddings.weight[256 + j], old_emb[pieces].mean(0))
        assert torch.equal(model.output.weight[256 + j], old_head[pieces].mean(0))
    assert (model.output.weight is model.tok_embeddings.weight) == model.config.tie_embeddings


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-mqa"])
def test_only_new_rows_receive_gradients(name, bpe):
    old_tok, new_tok, replaced = bpe
    model = resize_vocab(tiny_model(name), replaced)
    probe = torch.tensor([old_tok.encode(ENGLISH[1])])
    before = model(probe).detach()
    handles = train_only_new_rows(model, 256)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = torch.tensor([new_tok.encode(" ".join(NEW[:3]))[:100]])
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in {id(p): p for p in (model.tok_embeddings.weight, model.output.weight)}.values()]
        assert all(g[:256].abs().max() == 0 and g[256:].abs().max() > 0 for g in grads)
        assert all(p.grad is None for n, p in model.named_parameters() if "tok_embeddings" not in n and
                   "output" not in n)
        opt.step()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe)[..., :256], before[..., :256])  # old tokens: still the old model
    for h in handles:
        h.remove()


@torch.no_grad()
@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_extended_model_and_tokenizer_save_and_load(kind, bpe, sp, tmp_path):
    old_tok, new_tok, replaced = bpe if kind == "bpe" else sp
    model = resize_vocab(tiny_model("tiny-gqa", vocab_size=old_tok.vocab_size), replaced)
    save_hf(model, tmp_path / "ext", tokenizer=new_tok)
    loaded, tok = load_pretrained(tmp_path / "ext")
    text = HELD_OUT[2]
    assert tok.encode(text) == new_tok.encode(text) and tok.vocab_size == new_tok.vocab_size
    ids = torch.tensor([new_tok.encode(text)])
    assert loaded.config.vocab_size == new_tok.vocab_size
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_bad_input_is_refused():
    model = tiny_model("tiny-gqa")
    with pytest.raises(ValueError, match="at least one old piece"):
        resize_vocab(model, [[]])
    with pytest.raises(ValueError, match="must be old ids"):
        resize_vocab(model, [[300]])
