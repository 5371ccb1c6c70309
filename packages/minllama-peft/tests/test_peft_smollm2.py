"""On the real SmolLM2-135M-Instruct (9 query / 3 kv heads, tied head): our adapter, saved in HF PEFT's format,
gives the same logits in HF peft on transformers' Llama with the same weights."""
import pytest
import torch

from minllama.peft import LoraConfig, apply_lora, save_adapter
from peft_helpers import hf_model, randomize_adapter


@pytest.mark.slow
def test_smollm2_adapter_loads_in_hf_peft(tmp_path):
    from peft import PeftModel

    from minllama.core import load_pretrained

    ours, _ = load_pretrained("smollm2-135m-instruct", with_tokenizer=False)
    hf = hf_model(ours, tmp_path / "base")
    apply_lora(ours, LoraConfig(r=8, alpha=16, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
                                layers=(0, 14, 29), use_dora=True))
    randomize_adapter(ours, seed=4)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter")
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, hf_logits = ours(ids), theirs(input_ids=ids).logits
        with theirs.disable_adapter():
            base_logits = theirs(input_ids=ids).logits
    assert (hf_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(ours_logits, hf_logits, atol=2e-4, rtol=1e-4)
