"""load_pretrained_quantized: quantizing each layer as it is loaded gives the model that quantizing after loading
gives (oracle: ``quantize(load_pretrained(...))``, bit for bit), and the float model never exists as a whole."""
import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from minllama.core.checkpoint import load_pretrained, save_hf
from minllama.core.config import LlamaConfig
from minllama.core.formats import ours_to_gguf
from minllama.core.model import MinimalLlama
from minllama.quant import QuantEmbedding, QuantizationError, QuantLinear, load_pretrained_quantized, quantize
from minllama.quant import model as quant_model

Q = gguf.GGMLQuantizationType
TOKENS = torch.arange(20).view(2, 10) * 11 % 256


def float_model(name: str, n_layers: int = 3, seed: int = 0) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, n_layers=n_layers))
    model.init_weights()
    return model.eval()


def write_gguf(model: MinimalLlama, path) -> str:
    """A GGUF stored like SmolLM2's: the embedding (and an untied head) as Q8_0, the layers as Q4_1, norms F32."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": cfg.n_layers, "context_length": cfg.max_seq_len, "embedding_length": cfg.dim,
                       "feed_forward_length": cfg.hidden_dim, "attention.head_count": cfg.n_heads,
                       "attention.head_count_kv": cfg.n_kv_heads, "rope.dimension_count": cfg.head_dim,
                       "vocab_size": cfg.vocab_size}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        data = t.float().numpy()
        if data.ndim == 1:
            w.add_tensor(ours_to_gguf(name), data)
        else:
            kind = Q.Q4_1 if name.startswith("layers.") else Q.Q8_0
            w.add_tensor(ours_to_gguf(name), gguf_quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


def checkpoint(fmt: str, model: MinimalLlama, tmp_path) -> str:
    if fmt == "gguf":
        return write_gguf(model, tmp_path / "m.gguf")
    save_hf(model, tmp_path / "hf")
    return str(tmp_path / "hf")


def assert_same_quantized(a: MinimalLlama, b: MinimalLlama) -> None:
    """The same modules (class and options), every buffer and parameter bit for bit, the same quant_config, the
    same tie, the same logits."""
    assert a.quant_config == b.quant_config
    assert [(n, type(m).__name__, getattr(m, "options", None)) for n, m in a.named_modules()] == \
           [(n, type(m).__name__, getattr(m, "options", None)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (n, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):  # non-persistent ones too (RoPE, dtype probes)
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), n
    assert isinstance(a.tok_embeddings, QuantEmbedding) == isinstance(b.tok_embeddings, QuantEmbedding)
    if isinstance(b.tok_embeddings, QuantEmbedding):
        assert b.tok_embeddings.head is b.output
    assert torch.equal(a(TOKENS), b(TOKENS))


CASES = [("int8", {}), ("int4", {"group_size": 32, "head": "int8"})]
ALL = [("int4", {"group_size": 64}), ("nf4", {"double_quant": True}), ("fp8", {}), ("q8_0", {}), ("q4_0", {}),
       ("q4_1", {})]


@pytest.mark.parametrize("fmt", ["gguf", "hf"])
@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-gqa"], ids=["tied", "untied"])
@pytest.mark.parametrize("scheme,options", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_quantized_as_it_loads_equals_quantized_after_loading(fmt, name, scheme, options, tmp_path):
    source = checkpoint(fmt, float_model(name), tmp_path)
    oracle = quantize(load_pretrained(source, with_tokenizer=False)[0], scheme, **options)
    streamed, tokenizer = load_pretrained_quantized(source, scheme, with_tokenizer=False, **options)
    assert tokenizer is None and not streamed.training
    assert_same_quantized(oracle, streamed)


@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-gqa"], ids=["tied", "untied"])
@pytest.mark.parametrize("scheme,options", ALL, ids=[f"{s}-{o}" for s, o in ALL])
def test_every_scheme_and_bf16(name, scheme, options, tmp_path):
    source = checkpoint("hf", float_model(name), tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        oracle = quantize(load_pretrained(source, dtype, with_tokenizer=False)[0], scheme, **options)
        assert_same_quantized(oracle, load_pretrained_quantized(source, scheme, dtype, with_tokenizer=False,
                                                                **options)[0])


@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-gqa"], ids=["tied", "untied"])
def test_the_float_weights_of_only_one_layer_exist_at_a_time(name, tmp_path, monkeypatch):
    """Watch core's hook from outside: the head first (a tied embedding then reads the quantized head, so no float
    matrix is left while every layer is still on the meta device, shapes without memory; an untied embedding stays
    a float lookup table), then when layer i has been converted, no other float matrix is left in the model either
    (the later layers are still on meta)."""
    cfg_layers = 5
    model = float_model(name, n_layers=cfg_layers)
    kept = [] if model.config.tie_embeddings else ["tok_embeddings.weight"]
    source = checkpoint("gguf", model, tmp_path)
    seen = []

    def watching(source, dtype, device, with_tokenizer, convert):
        def watched(model, part):
            module = model.get_submodule(part) if part else None
            if module is not None:  # before the conversion: this part's weights are real floats
                assert all(not p.is_meta and p.is_floating_point() for p in module.parameters())
            convert(model, part)
            real = [n for n, p in model.named_parameters() if p.dim() == 2 and not p.is_meta]
            meta = {n.split(".")[1] for n, p in model.named_parameters() if p.is_meta and n.startswith("layers.")}
            seen.append((part, real, sorted(meta)))
        return load_pretrained(source, dtype, device, with_tokenizer, convert=watched)

    monkeypatch.setattr(quant_model, "load_pretrained", watching)
    model, _ = load_pretrained_quantized(source, "int8", with_tokenizer=False)
    assert [part for part, _, _ in seen] == ["output"] + [f"layers.{i}" for i in range(cfg_layers)] + [""]
    for i, (part, real, meta) in enumerate(seen):
        assert real == kept, part  # every linear of the part is an Int8Linear now: no float matrix is left
        assert meta == [str(j) for j in range(i, cfg_layers)], part
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * cfg_layers + 1


def test_a_wrong_scheme_or_option_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    source = checkpoint("hf", float_model("tiny-gqa"), tmp_path)
    monkeypatch.setattr(quant_model, "load_pretrained", lambda *a, **k: pytest.fail("the checkpoint was read"))
    with pytest.raises(QuantizationError, match="unknown scheme 'int3'"):
        load_pretrained_quantized(source, "int3")
    with pytest.raises(QuantizationError, match="scheme 'int8' has no option.*group_size"):
        load_pretrained_quantized(source, "int8", group_size=32)
    with pytest.raises(QuantizationError, match="unknown scheme 'int2'"):
        load_pretrained_quantized(source, "int4", head="int2")

