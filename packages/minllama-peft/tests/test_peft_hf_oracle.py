"""HF peft (on transformers' Llama with the same base weights) is the oracle: same adapter -> same outputs and
gradients; adapters cross between the two in HF PEFT's file format, in both directions."""
import pytest
import torch
import torch.nn.functional as F

from minllama.peft import (LoraConfig, apply_lora, disabled_adapters, load_adapter, merge, merge_and_unload,
                           save_adapter, unmerge)
from minllama.peft.hf_format import hf_module_name
from minllama.peft.lora import lora_modules
from peft_helpers import hf_lora_config, hf_model, randomize_adapter, tiny_model, tokens

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
CASES = {
    "lora": LoraConfig(r=4, alpha=8, targets=ALL),
    "rslora": LoraConfig(r=4, alpha=8, targets=("wq", "wk", "w2"), use_rslora=True,
                         layers=(1,)),  # and layers_to_transform
    "dora": LoraConfig(r=4, alpha=8, targets=ALL, use_dora=True),
}


def loss_of(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def hf_param(peft_model, path, kind):
    """peft's parameter for our module path and kind (lora_A, lora_B, lora_magnitude)."""
    module = peft_model.get_submodule(hf_module_name(path))
    if kind == "lora_magnitude":
        return module.lora_magnitude_vector["default"].weight
    return getattr(module, kind)["default"].weight


@pytest.mark.parametrize("arch", ["tiny-gqa", "tiny-mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft_same_outputs_and_gradients(tmp_path, arch, case):
    from peft import PeftModel
    from minllama.core.formats import meta_to_hf_rows

    ours = tiny_model(arch)
    hf = hf_model(ours, tmp_path / "base")
    apply_lora(ours, CASES[case])
    randomize_adapter(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    ids = tokens(ours)

    ours_logits, hf_logits = ours(ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, hf_logits, atol=2e-5, rtol=1e-4)
    with torch.no_grad(), disabled_adapters(ours):  # the adapter really matters
        assert (ours_logits - ours(ids)).abs().max() > 1e-3
    loss_of(ours_logits, ids).backward()
    loss_of(hf_logits, ids).backward()
    cfg = ours.config
    n = 0
    for path, m in lora_modules(ours):
        for kind in ("lora_A", "lora_B", "lora_magnitude"):
            if "default" not in getattr(m, kind):
                continue
            g = getattr(m, kind)["default"].grad
            heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(path.rsplit(".", 1)[1])
            if heads and kind != "lora_A":  # output rows live in HF's rotary layout there
                g = meta_to_hf_rows(g.view(g.shape[0], -1), heads).view(g.shape)
            torch.testing.assert_close(g, hf_param(theirs, path, kind).grad, atol=1e-5, rtol=1e-4)
            n += 1
    assert n == len(list(lora_modules(ours))) * (3 if CASES[case].use_dora else 2)


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_peft_to_ours_same_outputs(tmp_path, case):
    from peft import get_peft_model

    ours = tiny_model("tiny-gqa")
    hf = hf_model(ours, tmp_path / "base")
    torch.manual_seed(3)
    theirs = get_peft_model(hf, hf_lora_config(CASES[case], init_lora_weights=False))  # B random too
    theirs.save_pretrained(tmp_path / "adapter")
    load_adapter(ours, tmp_path / "adapter")
    ids = tokens(ours)
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), theirs(input_ids=ids).logits
        with theirs.disable_adapter():
            base_logits = theirs(input_ids=ids).logits
    assert (hf_logits - base_logits).abs().max() > 1e-3  # the adapter changes the outputs...
    torch.testing.assert_close(ours_logits, hf_logits, atol=2e-5, rtol=1e-4)  # ...and ours the same way


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_merged_weights_equal_peft_merge_and_unload(tmp_path, case):
    from peft import PeftModel

    from minllama.core.formats import meta_to_hf_rows

    ours = tiny_model("tiny-gqa")
    hf = hf_model(ours, tmp_path / "base")
    apply_lora(ours, CASES[case])
    randomize_adapter(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload()
    merge_and_unload(ours)
    q = meta_to_hf_rows(ours.layers[1].attention.wq.weight.detach(), ours.config.n_heads)
    torch.testing.assert_close(q, theirs.model.layers[1].self_attn.q_proj.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.layers[0].feed_forward.w2.weight, theirs.model.layers[0].mlp.down_proj.weight,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_merge_unmerge_exact(case):
    model = tiny_model("tiny-llama3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, CASES[case])
    randomize_adapter(model)
    ids = tokens(model)
    with torch.no_grad():
        unmerged = model(ids)
        merge(model)
        merged = model(ids)
        unmerge(model)
        again = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            torch.testing.assert_close(p, before[n.replace(".base.", ".")], atol=1e-6, rtol=0)
