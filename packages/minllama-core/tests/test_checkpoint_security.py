"""Untrusted checkpoints: nothing in a checkpoint folder may run code or make the loader read outside the folder."""
import json
import pickle

import pytest
import torch

from core_helpers import tiny_model
from minllama.core.checkpoint import CheckpointError, load_plain, load_pretrained, save_hf, save_meta


class Payload:
    """Unpickling this creates the file ``marker``: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_a_pickled_payload_in_a_meta_checkpoint_is_refused(tmp_path):
    save_meta(tiny_model("tiny-gqa"), tmp_path / "meta")
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = Payload(marker)
    torch.save(state, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is not plain data: it names .*exec.*refusing") \
            as e:
        load_pretrained(tmp_path / "meta")
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value) and "weights_only" not in str(e.value)  # no advice to retry


def test_load_plain_refuses_raw_pickles_of_any_protocol(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "x.pt").write_bytes(pickle.dumps({"a": Payload(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError, match="not plain data.*refusing to unpickle"):
            load_plain(tmp_path / "x.pt")
        assert not marker.exists()


def test_a_meta_file_holding_a_bare_tensor_is_one_clear_error(tmp_path):
    save_meta(tiny_model("tiny-gqa"), tmp_path / "meta")
    torch.save(torch.zeros(3), tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict of tensors"):
        load_pretrained(tmp_path / "meta")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path, name):
    save_hf(tiny_model("tiny-gqa"), tmp_path / "hf", max_shard_bytes=40_000)
    save_hf(tiny_model("tiny-gqa", seed=1), tmp_path / "outside")  # a real file the traversal would find
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "outside" / "model.safetensors").read_bytes())
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside") as e:
        load_pretrained(tmp_path / "hf")
    assert repr(name) in str(e.value)


def test_shards_that_are_links_load(tmp_path):
    """The Hugging Face cache stores every file of a snapshot as a link into its blob store: that must keep working."""
    model = tiny_model("tiny-gqa")
    save_hf(model, tmp_path / "hf", max_shard_bytes=40_000)
    (tmp_path / "blobs").mkdir()
    for f in (tmp_path / "hf").iterdir():
        f.rename(tmp_path / "blobs" / f.name)
        f.symlink_to(tmp_path / "blobs" / f.name)
    loaded, _ = load_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
