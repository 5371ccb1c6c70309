"""The HF PEFT files: exact round trip, the file layout peft expects, and one clear error per kind of bad file."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minllama.peft import AdapterError, LoraConfig, adapter_state_dict, apply_lora, load_adapter, save_adapter
from peft_helpers import randomize_adapter, tiny_model, tokens

CFG = LoraConfig(r=4, alpha=8, targets=("wq", "wk", "w3"), use_dora=True)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("tiny-gqa")
    apply_lora(model, CFG)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_round_trip_is_exact(saved):
    model, path = saved
    fresh = tiny_model("tiny-gqa")
    assert load_adapter(fresh, path) == CFG
    a, b = adapter_state_dict(model), adapter_state_dict(fresh)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = tokens(model)
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))


def test_file_layout_is_peft_s(saved):
    model, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"]
    assert config["target_modules"] == ["q_proj", "k_proj", "up_proj"]
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 3 * 3
    assert not list(path.parent.glob(".adapter.tmp-*"))  # the atomic save left no temporary directory


def rewrite(path, edit_tensors=None, edit_config=None):
    """Edit the files; the weights are written back without metadata (as HF peft writes them: no settings copy)."""
    if edit_tensors:
        tensors = load_file(path / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, path / "adapter_model.safetensors")
    if edit_config:
        config = json.loads((path / "adapter_config.json").read_text())
        edit_config(config)
        (path / "adapter_config.json").write_text(json.dumps(config))


def test_wrong_rank_is_named(saved):
    _, path = saved
    rewrite(path, edit_config=lambda c: c.update(r=8))
    with pytest.raises(AdapterError, match=r"disagree on r: adapter_config.json says 8, adapter_model.safetensors "
                                           r"was saved with 4"):
        load_adapter(tiny_model("tiny-gqa"), path)  # our files: the copy of the settings names the field
    rewrite(path, edit_tensors=lambda t: None)  # rewritten without metadata, like an adapter saved by HF peft
    with pytest.raises(AdapterError, match=r"has rank 4 but adapter_config.json says r=8"):
        load_adapter(tiny_model("tiny-gqa"), path)  # the shapes still tell


def test_missing_keys_are_named(saved):
    _, path = saved
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    rewrite(path, edit_tensors=lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=r"missing 1 tensor\(s\), e.g. " + key.replace(".", r"\.")):
        load_adapter(tiny_model("tiny-gqa"), path)


def test_another_base_is_named(saved):
    _, path = saved
    other = tiny_model("tiny-gqa", dim=32, hidden_dim=96)
    before = [n for n, _ in other.named_modules()]
    with pytest.raises(AdapterError, match=r"needs \(4, 32\).*trained on another base model"):
        load_adapter(other, path)
    assert [n for n, _ in other.named_modules()] == before  # checked before touching the model
    with pytest.raises(AdapterError, match=r"9 unexpected tensor\(s\), e.g. base_model.model.model.layers.1"):
        load_adapter(tiny_model("tiny-gqa", n_layers=1), path)


def test_unsupported_options_and_missing_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter(tiny_model(), tmp_path / "nowhere")
    rewrite(path, edit_config=lambda c: c.update(rank_pattern={"q_proj": 8}))
    with pytest.raises(AdapterError, match="rank_pattern"):
        load_adapter(tiny_model(), path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    model = tiny_model()
    apply_lora(model, LoraConfig())
    with pytest.raises(AdapterError, match="refusing to write"):
        save_adapter(model, tmp_path / "junk")
