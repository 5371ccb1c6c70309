"""FSDP2 trains an adapted model: 2 gloo ranks, each on half of the batch, end with the same adapter as one process
trained on the whole batch (FSDP averages the gradients over ranks, and the loss is a mean over equal halves)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minllama.peft import LoraConfig, adapter_parameters, adapter_state_dict, apply_lora
from peft_helpers import base_state, tiny_model, tokens

STEPS, WORLD = 3, 2


def make(dora: bool):
    model = tiny_model("tiny-gqa")
    torch.manual_seed(11)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2"), use_dora=dora))
    return model


def train(model, ids, steps=STEPS):
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for _ in range(steps):
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def worker(rank, port, dora, out):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make(dora)
        for layer in model.layers:  # each block is one FSDP unit: its base weights and adapters are sharded
            fully_shard(layer)
        fully_shard(model)
        ids = tokens(model, batch=4, length=16).chunk(WORLD)[rank]
        train(model, ids)
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in adapter_state_dict(model).items()}
        base = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in base_state(model).items()}
        if rank == 0:
            torch.save({"adapter": full, "base": base}, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dora", [False, True])
def test_fsdp2_two_ranks_match_one_process(tmp_path, dora):
    out = tmp_path / "rank0.pt"
    mp.start_processes(worker, args=(free_port(), dora, str(out)), nprocs=WORLD, start_method="fork")
    got = torch.load(out)

    reference = make(dora)
    base_before = base_state(reference)
    train(reference, tokens(reference, batch=4, length=16))
    want = adapter_state_dict(reference)
    assert got["adapter"].keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got["adapter"][k], want[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any((want[k] != 0).any() for k in want if k.endswith("lora_B"))  # it did train
    for k, v in base_before.items():  # and the base weights did not move, on any rank's shards
        assert torch.equal(got["base"][k], v), k
