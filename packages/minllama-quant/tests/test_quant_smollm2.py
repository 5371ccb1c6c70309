"""The real model: SmolLM2-135M-Instruct from its GGUF blocks, and every scheme against fp32 (slow)."""
import copy

import pytest
import torch

from minllama.core.chat_format import chat_format_for
from minllama.core.checkpoint import load_pretrained
from minllama.core.generate import generate
from minllama.quant import load_gguf_quantized, model_bytes, quantize, set_path
from minllama.quant.perplexity import heldout_text, perplexity

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fp32():
    return load_pretrained("smollm2-135m-instruct")  # (model, tokenizer)


def answer(model, tokenizer) -> str:
    prompt = chat_format_for(tokenizer).encode_dialog(tokenizer, QUESTION)
    return tokenizer.decode(generate(model, [prompt], 12, stop_ids=tokenizer.stop_ids)[0])


def rel_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gguf_blocks_run_the_model(fp32):
    """Same weights as core's dequantizing loader, a fifth of the bytes, the same answer."""
    ref, tokenizer = fp32
    model, tok = load_gguf_quantized()
    assert model_bytes(model) < 0.21 * model_bytes(ref)
    tokens = torch.tensor([tokenizer.encode("The lighthouse keeper wrote in her ledger every")])
    want = ref(tokens)
    set_path(model, "fallback")
    torch.testing.assert_close(model(tokens), want, rtol=1e-4, atol=1e-4)
    # the int4 kernel over the file's codes computes in bf16 (activations, weights, scales): ~2^-9 relative per
    # matmul, compounded over 30 layers
    set_path(model, "packed")
    assert rel_error(model(tokens), want) < 0.04
    set_path(model, "auto")
    assert "Paris" in answer(model, tok)


def next_token_kl(logits, ref_logits) -> float:
    """Mean KL(fp32 || quantized) of the next-token distributions: how much the predictions moved."""
    p, q = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


# Measured on 64 held-out tokens (README, section 10): 8-bit schemes move the predictions by KL ~0.002-0.03;
# 4-bit with groups of 32 ~0.07; coarser 4-bit grids ~0.4-0.7 on this small model. The greedy answer to the
# question is "The capital of France is Paris." in fp32; int8, Q8_0 and Q4_1 keep it, while fp8 and int4 g32 flip
# the first token ("L'Étoile ...") although their KL is small: a 135M model's greedy path is fragile. For those,
# "sensible" is only checked as fluent text of a few words. int4 g32 with an int8 head (the file's own layout:
# 4-bit layers, 8-bit head) moves the predictions as little as the 8-bit schemes and answers "Paris".
@pytest.mark.parametrize("scheme,opts,max_kl,says_paris", [
    ("int8", {}, 0.02, True), ("fp8", {}, 0.08, False), ("q8_0", {}, 0.02, True),
    ("int4", {"group_size": 32}, 0.2, False), ("q4_1", {}, 0.2, True), ("int4", {"group_size": 128}, 1.2, False),
    ("int4", {"group_size": 32, "head": "int8"}, 0.02, True),
    ("nf4", {"double_quant": True}, 1.0, False), ("q4_0", {}, 1.0, False)])
def test_scheme_predictions_and_answer(fp32, scheme, opts, max_kl, says_paris):
    ref, tokenizer = fp32
    tokens = torch.tensor([tokenizer.encode(heldout_text())[200:264]])
    model = quantize(copy.deepcopy(ref), scheme, **opts)
    set_path(model, "fallback")  # the stored numbers in fp32 arithmetic
    assert next_token_kl(model(tokens), ref(tokens)) < max_kl
    set_path(model, "auto")  # decoding through the fast kernels
    text = answer(model, tokenizer)
    assert ("Paris" in text) if says_paris else len(text.split()) >= 3


def test_int8_costs_under_one_percent_perplexity(fp32):
    ref, tokenizer = fp32
    tokens = tokenizer.encode(heldout_text())[:1024]
    base = perplexity(ref, tokens)
    q = perplexity(quantize(copy.deepcopy(ref), "int8"), tokens)
    assert 10 < base < 100  # a sane English-text perplexity for a 135M model
    assert abs(q / base - 1) < 0.01
