"""A crafted DCP checkpoint must never run code: every pickled file is read with a restricted unpickler."""
import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dist_helpers import tiny_model
from minllama.core import CheckpointError
from minllama.dist import check_checkpoint, dcp_to_model, load_checkpoint, read_config, save_checkpoint
from minllama.dist.safe_dcp import read_dcp_metadata, safe_load


class Payload:
    """Unpickling this creates the file ``marker``: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("tiny-gqa", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "step_00000001", model, opt, {"step": 1})
    return path, model, opt


def every_loader(path, model, opt):
    yield lambda: check_checkpoint(path)
    yield lambda: load_checkpoint(path, model, opt)
    yield lambda: read_config(path)
    yield lambda: dcp_to_model(path)


def test_a_crafted_metadata_pickle_is_refused_before_it_runs(saved, tmp_path):
    path, model, opt = saved
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for load in every_loader(path, model, opt):
        with pytest.raises(CheckpointError, match=r"builtins\.exec.*refusing"):
            load()
        assert not marker.exists()


def test_a_payload_inside_real_metadata_is_refused(saved, tmp_path):
    """The payload hidden in an otherwise valid index (a field of the storage metadata)."""
    path, model, opt = saved
    marker = tmp_path / "pwned"
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here
    metadata.storage_meta.modules = [Payload(marker)]
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path, model, opt)
    assert not marker.exists()


def test_the_untouched_checkpoint_still_loads(saved):
    path, model, opt = saved
    assert read_dcp_metadata(path).state_dict_metadata  # the allow-list covers what DCP writes
    fresh = tiny_model("tiny-gqa", seed=3)
    state = load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert state["step"] == 1 and state["optimizer_restored"]
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/passwd", "sub/../../x.distcp"])
def test_a_shard_outside_the_checkpoint_is_refused(saved, name):
    path, model, opt = saved
    metadata = pickle.loads((path / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = name
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    for load in every_loader(path, model, opt):
        with pytest.raises(CheckpointError, match="outside") as e:
            load()
        assert repr(name) in str(e.value)


def test_a_crafted_rng_state_is_refused(saved, tmp_path):
    path, model, opt = saved
    marker = tmp_path / "pwned"
    for protocol in (2, 4):  # torch.save's protocol, and one whose opcodes torch's safe unpickler refuses outright
        (path / "rng" / "rank0.pt").write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
        with pytest.raises(CheckpointError, match="rank0.pt is not plain data: .*refusing to unpickle"):
            load_checkpoint(path, model, opt)
        assert not marker.exists()
    torch.save({"cpu": "not a tensor"}, path / "rng" / "rank0.pt")
    with pytest.raises(CheckpointError, match="does not hold an RNG state"):
        load_checkpoint(path, model, opt)


def test_byte_items_are_read_as_plain_data_only(tmp_path):
    """DCP stores non-tensor values with torch.save and its default planner loads them with weights_only=False."""
    marker = tmp_path / "pwned"
    dcp.save({"evil": Payload(marker), "lr": 0.5}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    target = {"evil": None, "lr": 0.0}
    with pytest.raises(CheckpointError, match="value evil is not plain data: it names .*exec"):
        safe_load(target, tmp_path / "c", no_dist=True)
    assert not marker.exists()
    plain = {"lr": 0.0}
    safe_load(plain, tmp_path / "c", no_dist=True)
    assert plain["lr"] == 0.5


@pytest.mark.parametrize("state", [[1, 2], "x", {"step": "3"}, {"step": -1}, {"step": 1, "config": [1]},
                                   {"step": 1, "config": {"dim": "wide"}}, {"step": 1, "config": {"nope": 1}}])
def test_a_malformed_train_state_is_one_clear_error(saved, state):
    path, model, opt = saved
    (path / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="train_state.json"):
        load_checkpoint(path, model, opt)
