"""core/build.py: the one way from a config to weights (meta device, materialize, RoPE table, GGUF tensors)."""
import gguf
import pytest
import torch

from core_helpers import TINY, tiny_model
from minllama.core.build import gguf_tensors, materialize, meta_model
from minllama.core.gguf_file import GGUFFile
from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama, rope_cache, rope_frequencies
from test_checkpoint import write_gguf


def test_meta_model_allocates_nothing_and_materializes_like_a_plain_init():
    cfg = LlamaConfig.from_name("tiny-llama3")
    model = meta_model(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.manual_seed(3)
    materialize(model, "cpu")  # init_weights draws the same numbers whatever was built before
    torch.manual_seed(3)
    reference = MinimalLlama(cfg)
    torch.manual_seed(3)
    reference.init_weights()
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model.rope, rope_cache(rope_frequencies(cfg), cfg.max_seq_len))


def test_meta_model_never_allocates_a_weight_on_the_cpu_even_for_a_moment():
    """Linear and Embedding weights are made on meta directly: allocating each on the CPU and dropping it at once
    left the C allocator's heap stretched over holes that later tensors scattered over (+35 MB of peak RSS)."""
    from torch.overrides import TorchFunctionMode

    class CpuTensors(TorchFunctionMode):
        sizes: list[int] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type == "cpu":
                self.sizes.append(out.numel())
            return out

    cfg = LlamaConfig.from_name("tiny-llama3", max_seq_len=16)  # its RoPE table (made on the CPU) < any weight
    weight = cfg.dim * cfg.dim
    with CpuTensors() as spy:
        model = meta_model(cfg)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert spy.sizes and max(spy.sizes) < weight  # (the RoPE table was seen)
    assert torch.nn.Linear(3, 4).weight.device.type == "cpu"  # and nn.Linear builds on the CPU again after it


def test_materialize_without_init_leaves_weights_to_a_loader_and_computes_the_rope():
    source = tiny_model("tiny-gqa")
    model = materialize(meta_model(source.config), "cpu", init=False)
    assert not model.rope.is_meta and torch.equal(model.rope, source.rope)
    model.load_state_dict(source.state_dict())
    tokens = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(model(tokens), source(tokens), rtol=0, atol=0)


def test_reset_rope_follows_the_config_and_the_weights_device():
    model = tiny_model("tiny-llama3")
    model.rope = torch.zeros_like(model.rope)
    model.reset_rope()
    assert torch.equal(model.rope, rope_cache(rope_frequencies(model.config), model.config.max_seq_len))
    on_meta = meta_model(model.config)
    on_meta.load_state_dict(model.state_dict(), assign=True)  # weights arrive, the rope buffer is still meta
    on_meta.reset_rope()
    assert on_meta.rope.device.type == "cpu" and torch.equal(on_meta.rope, model.rope)


@pytest.mark.parametrize("name", TINY)
def test_gguf_tensors_names_every_weight_in_pytorch_shapes(name, tmp_path):
    model = tiny_model(name)
    path = write_gguf(model, tmp_path / "m.gguf")
    found, unexpected = gguf_tensors(GGUFFile(path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (k == "output.weight" and model.config.tie_embeddings)}
    assert {k: shape for k, (_, shape) in found.items()} == expected and unexpected == []


def test_gguf_tensors_reports_a_foreign_tensor(tmp_path):
    model = tiny_model("tiny-gqa")
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_tensor("token_embd.weight", model.tok_embeddings.weight.detach().numpy())
    w.add_tensor("rope_freqs.weight", torch.ones(8).numpy())  # known, and not ours: skipped silently
    w.add_tensor("mm.vision.proj", torch.ones(4, 4).numpy())  # a multimodal file's tensor
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    found, unexpected = gguf_tensors(GGUFFile(tmp_path / "x.gguf"))
    assert list(found) == ["tok_embeddings.weight"] and unexpected == ["mm.vision.proj"]
