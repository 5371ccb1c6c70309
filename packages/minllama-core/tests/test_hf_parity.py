"""Our checkpoints against transformers as the oracle: HF directories in both directions, and the real SmolLM2
GGUF, which transformers dequantizes and converts (q/k layout included) with its own code."""
import os

import pytest
import torch

from core_helpers import TINY, tiny_model
from minllama.core.cache import StaticKVCache
from minllama.core.checkpoint import load_pretrained, save_hf
from minllama.core.config import LlamaConfig
from minllama.core.formats import meta_to_hf_rows

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, LlamaConfig as HFConfig, LlamaForCausalLM  # noqa: E402

FP32 = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch.float32}


def sharpen(wq: torch.Tensor, wk: torch.Tensor, scale: float = 8.0) -> None:
    """At init scale (std 0.02) attention is almost uniform, so a wrong q/k layout would barely change the logits.
    Larger q/k weights make attention sharp and the comparison sensitive to the rotary layout."""
    with torch.no_grad():
        wq.mul_(scale)
        wk.mul_(scale)


def sharp_tiny(name, **overrides):
    model = tiny_model(name, **overrides)
    for layer in model.layers:
        sharpen(layer.attention.wq.weight, layer.attention.wk.weight)
    return model


# name -> (preset, overrides, max_shard_bytes): the tiny presets, wider heads than dim / n_heads (an explicit
# head_dim in config.json), and a checkpoint sharded with an index.
SAVE_CASES = {**{n: (n, {}, None) for n in TINY}, "head_dim-32": ("tiny-gqa", {"head_dim": 32}, None),
              "sharded": ("tiny-gqa", {}, 50_000)}


@torch.no_grad()
@pytest.mark.parametrize("case", SAVE_CASES)
def test_save_hf_loads_in_transformers(case, tmp_path):
    name, overrides, max_shard_bytes = SAVE_CASES[case]
    model = sharp_tiny(name, **overrides)
    save_hf(model, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", **FP32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    ours = model(tokens)
    assert (hf(tokens).logits - ours).abs().max().item() <= 1e-5
    # The test can see a layout error: the same weights in HF's row order give clearly different logits.
    for layer in model.layers:
        att = layer.attention
        att.wq.weight.copy_(meta_to_hf_rows(att.wq.weight, model.config.n_heads))
        att.wk.weight.copy_(meta_to_hf_rows(att.wk.weight, model.config.n_kv_heads))
    assert (model(tokens) - ours).abs().max().item() > 1e-2


HF_CONFIGS = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


@torch.no_grad()
@pytest.mark.parametrize("kind", HF_CONFIGS)
def test_transformers_save_pretrained_loads_here(kind, tmp_path):
    cfg = HFConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128, rms_norm_eps=1e-5, **HF_CONFIGS[kind])
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    for layer in hf.model.layers:
        sharpen(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)
    hf.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_pretrained(tmp_path / "hf")
    assert tokenizer is None  # no tokenizer files in the directory
    assert model.config.tie_embeddings == cfg.tie_word_embeddings
    tokens = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2))
    assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------- the real SmolLM2 GGUF
@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_pretrained(smollm2_gguf, with_tokenizer=False)[0]  # token ids come from the oracle's tokenizer


@pytest.fixture
def one_thread():
    """Decoding is many tiny ops: on 2 shared cores, OpenMP's thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle(smollm2_gguf):
    """transformers' own GGUF loader: it dequantizes with gguf-py and permutes q/k into its rotate_half layout."""
    directory, fname = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    hf = LlamaForCausalLM.from_pretrained(directory, gguf_file=fname, **FP32).eval()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    return hf, tok


def prompts(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    long_text = (" ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the river keeps "
                          f"flowing past {i * 7} old stone bridges toward the sea." for i in range(30)))
    ids = {"short": tok("The capital of France is").input_ids, "chatml": tok(chat).input_ids,
           "long": tok(long_text).input_ids[:500]}
    assert 450 <= len(ids["long"]) <= 500 and ids["chatml"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    return ids


@torch.no_grad()
@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(ours, oracle):
    hf, tok = oracle
    assert ours.config == LlamaConfig.from_name("smollm2-135m")  # the published SmolLM2-135M config
    assert ours.output.weight is ours.tok_embeddings.weight  # the GGUF has no output.weight: tied
    for kind, ids in prompts(tok).items():
        tokens = torch.tensor([ids])
        delta = (hf(tokens, logits_to_keep=1).logits[:, -1] - ours(tokens, last_only=True)[:, -1]).abs().max().item()
        assert delta <= 1e-3, f"{kind} prompt ({len(ids)} tokens): max |Δ logits| = {delta}"


@torch.no_grad()
@pytest.mark.slow
def test_smollm2_gguf_greedy_continuation_matches_transformers(ours, oracle, one_thread):
    hf, tok = oracle
    ids = prompts(tok)["chatml"]
    expected = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64,
                           eos_token_id=None, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert len(expected) == 64  # no early stop at <|im_end|>: both sides continue greedily past it
    # Ours: the model's own KV cache, one token per step (nothing shared with generate.py or transformers).
    cache = StaticKVCache(ours, 1, len(ids) + 64)
    logits = ours(torch.tensor([ids]), torch.arange(len(ids)), last_only=True, cache=cache)
    got = []
    for i in range(64):
        got.append(int(logits[0, -1].argmax()))
        logits = ours(torch.tensor([got[-1:]]), torch.tensor([len(ids) + i]), cache=cache)
    assert got == expected, f"ours: {tok.decode(got)!r}\ntransformers: {tok.decode(expected)!r}"
