"""FSDP2 training on 2 ranks against the oracle of one process training the same model on the same global batches."""
import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dist_helpers import ok, run_ranks, tiny_model
from minllama.core import LlamaConfig
from minllama.dist import (TokenBatches, apply_fsdp, data_parallel_mesh, init_from_rank0, materialize, meta_model,
                           set_prefetch, train_step)

STEPS = 4


def batches(seed: int = 1) -> TokenBatches:
    g = torch.Generator().manual_seed(seed)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=16, global_batch=4)


def single_process_losses(name="tiny-gqa", steps=STEPS):
    model = tiny_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches()
    losses = [train_step(model, opt, data.next_for_rank()) for _ in range(steps)]
    return losses, model.state_dict()


def full_weights(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank


VARIANTS = {  # name -> (model, apply_fsdp options): all trained in one 2-rank run (forking costs seconds)
    "fp32": ("tiny-gqa", {}),
    "fp32-tied": ("tiny-mqa", {}),  # a tied head: one parameter shared by the embedding and the output
    "no-prefetch": ("tiny-gqa", {"prefetch": 0}),
    "prefetch-2+ac": ("tiny-gqa", {"prefetch": 2, "activation_checkpointing": True}),
    "keep-after-forward": ("tiny-gqa", {"reshard_after_forward": False}),
    "bf16": ("tiny-gqa", {"param_dtype": torch.bfloat16}),
}


def fsdp_worker(rank, world):
    out = {}
    for variant, (name, fsdp_kwargs) in VARIANTS.items():
        model = tiny_model(name)
        apply_fsdp(model, data_parallel_mesh(torch.device("cpu")), **fsdp_kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = batches()
        losses = [train_step(model, opt, data.next_for_rank(rank, world)) for _ in range(STEPS)]
        out[variant] = {"losses": losses, "weights": full_weights(model),
                        "local_numel": sum(p.to_local().numel() for p in model.parameters()),
                        "master_dtypes": {p.dtype for p in model.parameters()}}
    return out


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return ok(run_ranks(fsdp_worker, 2, tmp=tmp_path_factory.mktemp("fsdp"), timeout=300))


@pytest.mark.parametrize("variant", ["fp32", "fp32-tied"])
def test_fsdp_fp32_training_equals_single_process(fsdp_runs, variant):
    name = VARIANTS[variant][0]
    ref_losses, ref_weights = single_process_losses(name)
    total = tiny_model(name).num_params()
    for run in fsdp_runs:
        r = run[variant]
        assert r["losses"] == pytest.approx(ref_losses, abs=1e-5)
        for k, v in ref_weights.items():  # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise
            torch.testing.assert_close(r["weights"][k], v, atol=3e-4, rtol=0)  # (1e-9) can move a weight ~lr/100
        assert r["local_numel"] <= total // 2 + 64  # each rank holds half of every parameter (rounded up)
    assert ref_losses[-1] != ref_losses[0]  # the steps did update the model


@pytest.mark.parametrize("variant", ["no-prefetch", "prefetch-2+ac", "keep-after-forward"])
def test_fsdp_prefetch_and_activation_checkpointing_keep_the_losses(fsdp_runs, variant):
    ref_losses, _ = single_process_losses()
    for run in fsdp_runs:
        assert run[variant]["losses"] == pytest.approx(ref_losses, abs=1e-5)


def test_fsdp_bf16_mixed_precision_within_bf16_tolerance(fsdp_runs):
    ref_losses, _ = single_process_losses()
    for run in fsdp_runs:
        r = run["bf16"]
        assert r["master_dtypes"] == {torch.float32}  # the sharded master weights and the optimizer stay fp32
        # bf16 keeps 8 bits of mantissa: relative error ~ 2^-8 per op, a few ulps after a few steps
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-2)
        assert r["losses"] != pytest.approx(ref_losses, abs=1e-6)  # and the forward really ran in bf16


def meta_init_worker(rank, world):
    torch.manual_seed(123 + rank)
    cfg = LlamaConfig.from_name("tiny-gqa")
    model = apply_fsdp(meta_model(cfg), data_parallel_mesh(torch.device("cpu")))
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated yet
    materialize(model, torch.device("cpu"))
    initial = full_weights(model)
    data = batches()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = train_step(model, opt, data.next_for_rank(rank, world))
    local = {k: p.to_local().clone() for k, p in model.named_parameters()}
    same_as_one_device = init_from_rank0(materialize(apply_fsdp(meta_model(cfg), data_parallel_mesh(
        torch.device("cpu"))), torch.device("cpu"), init=False), seed=0)
    return {"weights": initial, "rank0_init": full_weights(same_as_one_device), "local": local,
            "rope": model.rope.clone(), "loss": loss}


def test_meta_device_init_allocates_only_shards_and_initializes(tmp_path):
    r0, r1 = ok(run_ranks(meta_init_worker, 2, tmp=tmp_path))
    ref = tiny_model()
    torch.testing.assert_close(r0["rope"], ref.rope)  # the rope buffer was rebuilt after to_empty
    for k, v in ref.state_dict().items():
        assert r0["weights"][k].shape == v.shape
        assert r0["local"][k].shape[0] == -(-v.shape[0] // 2)  # dim 0 sharded in two
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k])  # both ranks see one consistent model
    w = r0["weights"]["layers.0.attention.wq.weight"]
    assert 0.015 < float(w.std()) < 0.025  # init_weights' std 0.02 on the shards, not uninitialized memory
    assert torch.equal(r0["weights"]["norm.weight"], torch.ones(64))
    assert r0["loss"] == pytest.approx(r1["loss"]) and 5.0 < r0["loss"] < 6.0  # ~ln(256) at init
    for r in (r0, r1):  # init_from_rank0: the numbers of a one-device init, whatever the world size
        for k, v in ref.state_dict().items():
            assert torch.equal(r["rank0_init"][k], v), k


class RecordingBlock:
    """Stands in for an FSDP-wrapped block: records which blocks it was asked to prefetch."""

    def __init__(self, i):
        self.i, self.forward, self.backward = i, None, None

    def set_modules_to_forward_prefetch(self, blocks):
        self.forward = [b.i for b in blocks]

    def set_modules_to_backward_prefetch(self, blocks):
        self.backward = [b.i for b in blocks]


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_order_is_next_blocks_forward_and_previous_blocks_backward(depth):
    blocks = [RecordingBlock(i) for i in range(4)]
    set_prefetch(blocks, depth)
    for b in blocks:
        assert b.forward == (list(range(b.i + 1, min(4, b.i + 1 + depth))) or None)
        assert b.backward == (list(range(b.i - 1, max(-1, b.i - 1 - depth), -1)) or None)  # backward: in reverse
    assert blocks[0].forward == [1, 2][:depth] and blocks[3].backward == [2, 1][:depth]
