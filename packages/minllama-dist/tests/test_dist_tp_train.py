"""Tensor-parallel training (sequence parallel, loss parallel) and FSDP x TP, against the oracle: one process
training the same model on the same batches with the same optimizer."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from dist_helpers import ok, run_ranks, tiny_model
from minllama.core import LlamaConfig
from minllama.dist import (TokenBatches, apply_activation_checkpointing, apply_tensor_parallel, load_checkpoint,
                           save_checkpoint, train_step)
from minllama.dist.mesh import build_mesh, plan_mesh
from minllama.dist.parallelize import apply_tensor_parallel_training, check_tensor_parallel, parallelize_llama, \
    tp_lm_loss

STEPS = 3
BATCH, SEQ = 4, 16


def batches(position: int = 0) -> TokenBatches:
    g = torch.Generator().manual_seed(1)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=SEQ, global_batch=BATCH,
                        position=position)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def record_grads(model, optimizer) -> list:
    """Every step's gradients (after clipping, as the optimizer sees them), gathered to full tensors."""
    seen = []
    optimizer.register_step_pre_hook(
        lambda *_: seen.append({n: full(p.grad) for n, p in model.named_parameters()}))
    return seen


def train(model, steps, dp_rank=0, dp=1, position=0):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    grads = record_grads(model, optimizer)
    data = batches(position)
    losses = [train_step(model, optimizer, data.next_for_rank(dp_rank, dp)) for _ in range(steps)]
    return losses, grads, {n: full(p) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------- equality with one process
CASES = {  # name: (ranks, preset, overrides, mesh degrees, parallelize_llama's options (with FSDP), or None: TP alone)
    "tp2": (2, "tiny-gqa", {}, dict(tp=2), {}),
    "tp2-tied": (2, "tiny-gqa", {"tie_embeddings": True}, dict(tp=2), None),
    "dp2xtp2": (4, "tiny-llama3", {}, dict(tp=2, dp_shard=2), {}),
    "dp2xtp2-tied-checkpointed": (4, "tiny-gqa", {"tie_embeddings": True}, dict(tp=2, dp_shard=2),
                                  {"activation_checkpointing": True}),
}
BF16 = {"dp2xtp2-bf16": (4, "tiny-gqa", {}, dict(tp=2, dp_shard=2), {"param_dtype": torch.bfloat16})}


def tp_train_worker(rank, world, case):
    _, preset, overrides, degrees, options = {**CASES, **BF16}[case]
    mesh = build_mesh(plan_mesh(world, **degrees))
    model = tiny_model(preset, **overrides)
    if options is not None:
        parallelize_llama(model, mesh, **options)
    else:
        apply_tensor_parallel_training(model, mesh["tp"])
    between_blocks = []
    model.layers[0].register_forward_hook(lambda m, i, out: between_blocks.append(tuple(out.shape)))
    dp = mesh["dp_shard"]
    losses, grads, weights = train(model, STEPS, dp.get_local_rank(), dp.size())
    tokens = batches().batch(0)[dp.get_local_rank() * BATCH // dp.size():][:BATCH // dp.size()]
    with torch.no_grad():  # loss parallel against the plain cross-entropy of the gathered logits
        logits = model(tokens[:, :-1])
        parallel_loss = tp_lm_loss(logits, tokens).full_tensor()
        gathered = logits.full_tensor()
        plain_loss = F.cross_entropy(gathered.flatten(0, 1), tokens[:, 1:].flatten())
    tied = model.output.weight is model.tok_embeddings.weight
    return {"losses": losses, "grads": grads, "weights": weights, "between_blocks": between_blocks[0],
            "logits_placement": logits.placements, "local_logits": tuple(logits.to_local().shape),
            "parallel_loss": parallel_loss, "plain_loss": plain_loss, "tied": tied}


@pytest.fixture(scope="module", params=list(CASES))
def tp_run(request, tmp_path_factory):
    case = request.param
    return case, ok(run_ranks(tp_train_worker, CASES[case][0], case, tmp=tmp_path_factory.mktemp(case)))


def test_tp_training_equals_one_process(tp_run):
    case, runs = tp_run
    _, preset, overrides, degrees, _ = CASES[case]
    losses, grads, weights = train(tiny_model(preset, **overrides), STEPS)
    assert len(set(losses)) == STEPS  # the oracle moves: equal losses are not trivially equal
    # (its gradient norm is about 1.8: train_step's clipping to 1.0 acts, on the DTensor gradients too)
    for r in runs:
        assert r["losses"] == pytest.approx(losses, abs=1e-5)
        for step in range(STEPS):
            assert r["grads"][step].keys() == grads[step].keys()
            for name, g in grads[step].items():
                torch.testing.assert_close(r["grads"][step][name], g, atol=1e-5, rtol=1e-4, msg=f"{name} @ {step}")
        for name, w in weights.items():  # AdamW's first steps move by ~lr * sign(grad): 1e-7 grad noise on a
            torch.testing.assert_close(r["weights"][name], w, atol=1e-4, rtol=0)  # near-zero gradient shows more


def test_sequence_parallel_and_vocab_sharded_logits(tp_run):
    case, runs = tp_run
    _, preset, overrides, degrees, _ = CASES[case]
    cfg = LlamaConfig.from_name(preset, **overrides)
    rows = BATCH // degrees.get("dp_shard", 1)
    for r in runs:
        # between blocks each rank holds half the sequence (sequence parallel), the logits half the vocabulary
        assert r["between_blocks"] == (rows, SEQ // 2, cfg.dim)
        assert r["logits_placement"][-1] == Shard(2) and r["local_logits"] == (rows, SEQ, cfg.vocab_size // 2)
        torch.testing.assert_close(r["parallel_loss"], r["plain_loss"], atol=1e-6, rtol=1e-6)
        assert r["tied"] == cfg.tie_embeddings


def test_fsdp_x_tp_bf16_within_bf16_tolerance(tmp_path):
    (case, (world, preset, *_)), = BF16.items()
    r = ok(run_ranks(tp_train_worker, world, case, tmp=tmp_path))[0]
    losses, _, _ = train(tiny_model(preset), STEPS)
    assert r["losses"] == pytest.approx(losses, rel=1e-2)  # bf16: 8 mantissa bits, ~2^-8 per operation
    assert r["losses"] != pytest.approx(losses, abs=1e-6)  # and the blocks really computed in bf16
    assert {w.dtype for w in r["weights"].values()} == {torch.float32}  # the master weights stay fp32


# ------------------------------------------------------------------------------------------- resume across meshes
def resume_worker(rank, world, degrees, load, save, steps):
    """Train ``steps`` steps on the mesh ``degrees``, from checkpoint ``load`` (or from scratch), then save."""
    mesh = build_mesh(plan_mesh(world, **degrees))
    model = parallelize_llama(tiny_model("tiny-gqa", seed=7 if load else 0), mesh)  # a load must fix the seed
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = batches()
    if load:
        state = load_checkpoint(load, model, optimizer)
        assert state["optimizer_restored"]
        data.position = state["data_position"]
    dp = mesh["dp_shard"]
    losses = [train_step(model, optimizer, data.next_for_rank(dp.get_local_rank(), dp.size()))
              for _ in range(steps)]
    if save:
        save_checkpoint(save, model, optimizer, {"data_position": data.position})
    return losses


def test_dcp_checkpoint_moves_across_meshes(tmp_path):
    """FSDP x TP on 4 ranks saves; TP on 2 and FSDP on 2 resume from it; one plain process resumes from TP's."""
    oracle = tiny_model("tiny-gqa")
    opt = torch.optim.AdamW(oracle.parameters(), lr=3e-3, weight_decay=0.1)
    data = batches()
    unbroken = [train_step(oracle, opt, data.next_for_rank()) for _ in range(6)]

    def run(world, degrees, load, save, steps):
        return ok(run_ranks(resume_worker, world, degrees, load, save, steps, tmp=tmp_path))[0]

    first = run(4, dict(tp=2, dp_shard=2), None, tmp_path / "a", 2)
    by_tp = run(2, dict(tp=2), tmp_path / "a", tmp_path / "b", 2)
    by_fsdp = run(2, dict(dp_shard=2), tmp_path / "a", None, 2)
    model = tiny_model("tiny-gqa", seed=7)  # one process, no process group: plain tensors
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    state = load_checkpoint(tmp_path / "b", model, optimizer)
    assert state["world_size"] == 2 and state["optimizer_restored"]
    data = batches(state["data_position"])
    alone = [train_step(model, optimizer, data.next_for_rank()) for _ in range(2)]
    # the layouts reduce in other orders: equal to float rounding, not bit for bit
    assert first + by_tp + alone == pytest.approx(unbroken, abs=1e-5)
    assert by_fsdp == pytest.approx(unbroken[2:4], abs=1e-5)
    # and the AdamW moments did travel: a resume from the same weights with a fresh optimizer leaves the curve
    model = tiny_model("tiny-gqa", seed=7)
    load_checkpoint(tmp_path / "b", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = batches(state["data_position"])
    fresh = [train_step(model, optimizer, data.next_for_rank()) for _ in range(2)]
    assert fresh[0] == pytest.approx(unbroken[4], abs=1e-5)  # (the weights are right: the first loss agrees)
    assert fresh[1] != pytest.approx(unbroken[5], abs=1e-4)


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(world=4, tp=3), "pp x cp x tp = 1 x 1 x 3 = 3 does not divide the world size 4"),
    (dict(world=4, tp=2, dp_shard=4), "is not the world size 4: leave --dp-shard out (it is derived: 2)"),
    (dict(world=4, tp=0), "--tp 0: a parallel degree is a whole number >= 1"),
    (dict(world=2, tp=2, cfg="tiny-mqa"), "n_kv_heads=1 does not split over --tp 2 ranks"),
    (dict(world=8, tp=8, cfg="tiny-gqa"), "n_heads=4 does not split over --tp 8 ranks"),
    (dict(world=4, pp=4, cfg="tiny-gqa"), "n_layers=2 does not split into pp=4 pipeline stages"),
    (dict(world=2, tp=2, seq_len=15), "--seq-len 15 does not split over tp = 2 ranks"),
])
def test_bad_mesh_is_one_clear_error(kwargs, message):
    if "cfg" in kwargs:
        kwargs["cfg"] = LlamaConfig.from_name(kwargs["cfg"])
    with pytest.raises(ValueError) as e:
        plan_mesh(kwargs.pop("world"), **kwargs)
    assert message in str(e.value)


def test_mesh_plan_derives_dp_shard():
    assert plan_mesh(8, tp=2).sizes == (1, 4, 1, 2)
    assert plan_mesh(8, tp=2, pp=2, cp=2, cfg=LlamaConfig.from_name("tiny-gqa"), seq_len=16).dp_shard == 1
    assert plan_mesh(1).sizes == (1, 1, 1, 1)


def test_check_tensor_parallel_names_the_degrees_that_fit():
    with pytest.raises(ValueError, match=r"hidden_dim=129 does not split over --tp 2.*--tp in \[1\]"):
        check_tensor_parallel(LlamaConfig.from_name("tiny-gqa", hidden_dim=129), 2)
    with pytest.raises(ValueError, match=r"--tp in \[1, 2\]"):
        check_tensor_parallel(LlamaConfig.from_name("tiny-gqa"), 4)


# ------------------------------------------------------------------------------------------- activation memory
def saved_activation_bytes(model, tokens) -> int:
    """Bytes of activations that the blocks of ``model`` keep for backward on this rank, in one forward (the cost
    that grows with depth; weights excluded, a tensor kept twice counted once)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    def local(t):
        t = t._local_tensor if isinstance(t, DTensor) else t
        return t.trigger_wait() if isinstance(t, AsyncCollectiveTensor) else t

    weights = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    kept, in_block = {}, [False]

    def pack(t):
        storage = local(t).untyped_storage()
        if in_block[0] and storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: in_block.__setitem__(0, True))
        block.register_forward_hook(lambda *_: in_block.__setitem__(0, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1])
    return sum(kept.values())


def memory_worker(rank, world):
    mesh = build_mesh(plan_mesh(world, tp=world))["tp"]
    tokens = batches().batch(0)
    out = {}
    for plan, apply in (("blocks only", apply_tensor_parallel), ("sequence parallel", apply_tensor_parallel_training)):
        for checkpointed in (False, True):
            model = apply(tiny_model("tiny-gqa"), mesh)
            if checkpointed:
                for block in model.layers:
                    apply_activation_checkpointing(block)
            out[plan, checkpointed] = saved_activation_bytes(model, tokens)
    return out


def test_sequence_parallel_saves_activation_memory(tmp_path):
    saved = ok(run_ranks(memory_worker, 2, tmp=tmp_path))[0]
    cfg = LlamaConfig.from_name("tiny-gqa")
    block_input = BATCH * SEQ * cfg.dim * 4  # (B, T, dim) fp32
    rope = SEQ * cfg.head_dim // 2 * 2 * 4  # (T, head_dim/2, 2) fp32, one tensor passed to every block
    # a checkpointed block keeps only its inputs: with sequence parallel, half the positions of the stream
    assert saved["blocks only", True] == cfg.n_layers * block_input + rope
    assert saved["sequence parallel", True] == cfg.n_layers * block_input // 2 + rope
    # without checkpointing: each RMSNorm keeps its input x, the normalized x (B, T, dim) and rsqrt (B, T, 1),
    # which sequence parallel halves; the gathered norm output that wq / w1 keep for their weight gradients is
    # whole in both plans (README, section 4b). So the difference is exactly half of the 2 norms' of every block:
    norm_keeps = 2 * block_input + BATCH * SEQ * 4
    assert saved["blocks only", False] - saved["sequence parallel", False] == cfg.n_layers * 2 * norm_keeps // 2


def refusal_worker(rank, world):
    from minllama.core.cache import StaticKVCache

    model = parallelize_llama(tiny_model("tiny-gqa"), build_mesh(plan_mesh(world, tp=world)))
    errors = []
    for call in (lambda: model(torch.randint(0, 256, (2, 15))),  # 15 positions: not a multiple of tp = 2
                 lambda: model(tokens=torch.randint(0, 256, (2, 15))),
                 lambda: model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2), cache=StaticKVCache(model, 1, 8))):
        try:
            call()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_tp_training_refuses_what_sequence_parallel_cannot_split(tmp_path):
    """Checked before any collective, on every rank alike: never ranks exchanging slices of different sizes."""
    for errors in ok(run_ranks(refusal_worker, 2, tmp=tmp_path)):
        assert "15 tokens per row do not split over tp=2 ranks" in errors[0] and "pad_to_multiple" in errors[0]
        assert errors[1] == errors[0]
        assert "does not decode with a KV cache" in errors[2] and "tp.apply_tensor_parallel" in errors[2]
