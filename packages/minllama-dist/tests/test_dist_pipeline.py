"""Pipeline parallelism against the oracle of one process training the same model on the same global batches:
2 ranks (pp=2) with each schedule, 4 ranks (pp=2 x dp_shard=2, FSDP inside each stage), checkpoints across
layouts, and the errors; and bf16 mixed precision against the non-pipelined bf16 run (FSDP) of the same model."""
import pytest
import torch
from torch.distributed.tensor import DTensor

from dist_helpers import RecordingAdamW, as_full, ok, run_ranks, tiny_model
from minllama.core import LlamaConfig
from minllama.dist import (TokenBatches, apply_fsdp, build_pipeline, check_pipeline_args, cut_stage,
                           data_parallel_mesh, dcp_to_model, load_checkpoint, pipeline_mesh, pipeline_train_step,
                           save_checkpoint, split_layers, train_step)

STEPS = 3
CPU = torch.device("cpu")
SCHEDULE_LAYERS = {"gpipe": 2, "1f1b": 2, "interleaved": 4}  # interleaved: 2 stages per rank x 2 ranks
# Gradients are compared unclipped: clipping to norm 1 would hide a gradient scaled by any factor. One variant clips
# (its norm is then summed over the stages) and is compared with one process clipping the same way.
VARIANTS = {"gpipe": ("gpipe", None, False), "1f1b": ("1f1b", None, False),  # (schedule, clip, recompute)
            "interleaved": ("interleaved", None, False), "1f1b-clipped": ("1f1b", 1.0, False),
            "gpipe-activation-checkpointing": ("gpipe", None, True)}


def batches() -> TokenBatches:
    g = torch.Generator().manual_seed(1)
    return TokenBatches(torch.randint(0, 256, (4000,), generator=g), seq_len=16, global_batch=4)


def single_process(n_layers: int, steps: int = STEPS, clip: float | None = 1.0):
    """The oracle: one process, the full model, the whole global batch per step."""
    model = tiny_model("tiny-gqa", n_layers=n_layers)
    opt = RecordingAdamW(model, lr=1e-2)
    data = batches()
    losses = [train_step(model, opt, data.next_for_rank(), max_grad_norm=clip) for _ in range(steps)]
    return losses, opt.seen, model


def pipelined_run(rank, world, variant, microbatches, pp=2):
    schedule, clip, recompute = VARIANTS[variant]
    model = tiny_model("tiny-gqa", n_layers=SCHEDULE_LAYERS[schedule])  # every rank: the same full model
    pipe = build_pipeline(model, pipeline_mesh(CPU, pp), CPU, schedule, microbatches,
                          activation_checkpointing=recompute)
    opt = RecordingAdamW(pipe.model, lr=1e-2)
    data = batches()
    losses = [pipeline_train_step(pipe, opt, data.next_for_rank(pipe.dp_rank, pipe.dp_size), max_grad_norm=clip)
              for _ in range(STEPS)]
    return {"losses": losses, "grads": opt.seen, "keys": sorted(pipe.model.state_dict()),
            "shapes": {k: tuple(as_full(v).shape) for k, v in pipe.model.state_dict().items()},
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                               for p in pipe.model.parameters()),
            "stages": [s.stage_index for s in pipe.stages],
            "recomputes": all("forward" in vars(b) for b in pipe.model.layers.values())}  # checkpointed forward


def two_rank_worker(rank, world):
    return {variant: pipelined_run(rank, world, variant, microbatches=4) for variant in VARIANTS}


@pytest.fixture(scope="module")
def pp2_runs(tmp_path_factory):
    return ok(run_ranks(two_rank_worker, 2, tmp=tmp_path_factory.mktemp("pp2"), timeout=300))


def assert_equal_to_single_process(runs, variant):
    schedule, clip, _ = VARIANTS[variant]
    ref_losses, ref_grads, _ = single_process(SCHEDULE_LAYERS[schedule], clip=clip)
    for run in runs:
        assert run["losses"] == pytest.approx(ref_losses, abs=1e-5)  # the global loss, on every rank
        for step, grads in enumerate(run["grads"]):  # each rank: the gradients of its own layers, every step
            # Step 1: the same weights, so only the summation order differs (measured 2e-8). Later steps start from
            # weights AdamW moved: where a gradient is ~0, lr * m / sqrt(v) turns 1e-9 of rounding noise into a
            # visible weight difference (see test_dist_fsdp), and the next gradients inherit it (measured 1.2e-5).
            atol = 1e-6 if step == 0 else 3e-5
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[step][name], atol=atol, rtol=0, msg=f"{name} step {step}")
    assert sum(len(r["grads"][0]) for r in runs) >= len(ref_grads[0])  # every parameter was checked somewhere
    assert ref_losses[-1] != ref_losses[0]  # the steps did update the model
    norm = torch.stack([g.norm() for g in ref_grads[0].values()]).norm()
    assert norm == pytest.approx(1.0, rel=1e-4) if clip else norm > 1.0  # the clipped variant really clips


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pipeline_training_equals_single_process(pp2_runs, variant):
    assert_equal_to_single_process([r[variant] for r in pp2_runs], variant)


@pytest.mark.parametrize("schedule", list(SCHEDULE_LAYERS))
def test_stages_keep_the_full_models_parameter_names(pp2_runs, schedule):
    full = tiny_model("tiny-gqa", n_layers=SCHEDULE_LAYERS[schedule]).state_dict()
    r0, r1 = (r[schedule] for r in pp2_runs)
    assert set(r0["keys"]).isdisjoint(r1["keys"])  # each parameter lives on exactly one rank ...
    assert sorted(r0["keys"] + r1["keys"]) == sorted(full)  # ... under its name in the full model
    for r in (r0, r1):
        assert all(r["shapes"][k] == tuple(full[k].shape) for k in r["keys"])
    assert "tok_embeddings.weight" in r0["keys"] and {"norm.weight", "output.weight"} <= set(r1["keys"])


def test_activation_checkpointing_was_applied_to_every_block(pp2_runs):
    assert all(r["gpipe-activation-checkpointing"]["recomputes"] for r in pp2_runs)
    assert not any(r["gpipe"]["recomputes"] for r in pp2_runs)


def test_interleaved_puts_two_looped_stages_on_each_rank(pp2_runs):
    r0, r1 = (r["interleaved"] for r in pp2_runs)
    assert r0["stages"] == [0, 2] and r1["stages"] == [1, 3]
    assert {k.split(".")[1] for k in r0["keys"] if k.startswith("layers.")} == {"0", "2"}
    assert {k.split(".")[1] for k in r1["keys"] if k.startswith("layers.")} == {"1", "3"}


FOUR_RANK_VARIANTS = ("gpipe", "1f1b-clipped", "interleaved")


def pp_fsdp_worker(rank, world, ckpt):
    out = {variant: pipelined_run(rank, world, variant, microbatches=2) for variant in FOUR_RANK_VARIANTS}
    model = tiny_model("tiny-gqa")  # and a checkpoint of this layout, model + AdamW state, for one process
    pipe = build_pipeline(model, pipeline_mesh(CPU, 2), CPU, "1f1b", 2)
    opt = torch.optim.AdamW(pipe.model.parameters(), lr=1e-2)
    data = batches()
    for _ in range(2):
        pipeline_train_step(pipe, opt, data.next_for_rank(pipe.dp_rank, pipe.dp_size))
    save_checkpoint(ckpt, pipe.model, opt, {"data_position": data.position})
    return out


def test_pipeline_x_fsdp_on_four_ranks_equals_single_process(tmp_path):
    runs = ok(run_ranks(pp_fsdp_worker, 4, str(tmp_path / "ckpt"), tmp=tmp_path, timeout=300))
    for variant in FOUR_RANK_VARIANTS:
        assert_equal_to_single_process([r[variant] for r in runs], variant)
    # mesh [[0, 1], [2, 3]]: ranks 0, 1 hold stage 0, each half of it (FSDP); ranks 2, 3 hold stage 1
    assert runs[0]["gpipe"]["keys"] == runs[1]["gpipe"]["keys"] != runs[2]["gpipe"]["keys"] == runs[3]["gpipe"]["keys"]
    stage0 = sum(tiny_model().state_dict()[k].numel() for k in runs[0]["gpipe"]["keys"])
    assert runs[0]["gpipe"]["local_numel"] <= stage0 // 2 + 64
    # the PP x FSDP checkpoint is one ordinary model in one process, trained exactly as one process trains it
    _, _, ref = single_process(2, steps=2)
    back = dcp_to_model(tmp_path / "ckpt")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=3e-4, rtol=0)  # (Adam: see test_dist_fsdp)


def resume_on_pipeline_worker(rank, world, single_ckpt, pp_ckpt):
    """1 process -> pp=2: load a one-process checkpoint (weights + AdamW state), train on, save again."""
    pipe = build_pipeline(tiny_model("tiny-gqa", seed=7), pipeline_mesh(CPU, 2), CPU, "1f1b", 2)  # other weights
    opt = torch.optim.AdamW(pipe.model.parameters(), lr=1e-2)
    state = load_checkpoint(single_ckpt, pipe.model, opt)
    data = batches()
    data.position = state["data_position"]
    losses = [pipeline_train_step(pipe, opt, data.next_for_rank()) for _ in range(2)]
    save_checkpoint(pp_ckpt, pipe.model, opt, {"data_position": data.position})
    return {"losses": losses, "restored": state["optimizer_restored"]}


def test_checkpoint_moves_between_one_process_and_a_pipeline(tmp_path):
    # one unbroken single-process run of 6 steps: the oracle
    ref_losses, _, _ = single_process(2, steps=6)
    # steps 1-2 in one process, saved; 3-4 on a 2-stage pipeline, saved; 5-6 in one process again
    model = tiny_model("tiny-gqa")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches()
    first = [train_step(model, opt, data.next_for_rank()) for _ in range(2)]
    save_checkpoint(tmp_path / "one", model, opt, {"data_position": data.position})
    middle = ok(run_ranks(resume_on_pipeline_worker, 2, str(tmp_path / "one"), str(tmp_path / "pp"), tmp=tmp_path))
    model = tiny_model("tiny-gqa", seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = load_checkpoint(tmp_path / "pp", model, opt)  # pipeline -> 1 process
    assert state["optimizer_restored"] and all(r["restored"] for r in middle)
    assert len(opt.state) == len(list(model.parameters()))  # every parameter's AdamW moments came back
    data.position = state["data_position"]
    last = [train_step(model, opt, data.next_for_rank()) for _ in range(2)]
    assert first + middle[0]["losses"] + last == pytest.approx(ref_losses, abs=1e-5)
    assert middle[0]["losses"] == middle[1]["losses"]


BF16_STEPS = 6
# bf16 keeps 8 bits of mantissa: two runs that split the batch differently round differently. Measured (unclipped,
# lr 1e-2): the pipeline's losses within 8.2e-3 of the FSDP bf16 run over 6 steps (each within 1.5e-2 of fp32);
# its first-step gradients within 0.56% of FSDP's (relative to each tensor's largest entry) and 1.2% of fp32's; a
# gradient off by a factor of 2 would be 100% off
BF16_LOSS_TOLERANCE = 2e-2
BF16_GRAD_TOLERANCE = 0.02


def bf16_worker(rank, world):
    """The same model and batches trained in bf16 twice on 2 ranks: a 2-stage pipeline (1F1B, 4 micro-batches,
    so the stages also sum 4 micro-batches' gradients), and FSDP over both ranks, no pipeline (section 2).
    Unclipped: AdamW barely notices a gradient scaled by a constant, the recorded gradients do."""
    bf16 = torch.bfloat16
    pipe = build_pipeline(tiny_model("tiny-gqa"), pipeline_mesh(CPU, 2), CPU, "1f1b", 4, param_dtype=bf16)
    sent = []  # the dtype of what the first stage outputs, which is what it sends to the second
    if pipe.model.tok_embeddings is not None:
        pipe.model.register_forward_hook(lambda m, args, out: sent.append(out.dtype))
    opt = RecordingAdamW(pipe.model, lr=1e-2)
    data = batches()
    pipelined = [pipeline_train_step(pipe, opt, data.next_for_rank(), max_grad_norm=None) for _ in range(BF16_STEPS)]
    model = apply_fsdp(tiny_model("tiny-gqa"), data_parallel_mesh(CPU), param_dtype=bf16)
    flat_opt = RecordingAdamW(model, lr=1e-2)
    data = batches()
    flat = [train_step(model, flat_opt, data.next_for_rank(rank, world), max_grad_norm=None)
            for _ in range(BF16_STEPS)]
    return {"pipelined": pipelined, "fsdp": flat, "sent": sent[-1:], "grads": opt.seen[0],
            "fsdp_grads": flat_opt.seen[0], "master_dtypes": {p.dtype for p in pipe.model.parameters()}}


def bf16_error(got: dict, want: dict) -> float:
    """The largest gradient difference, relative to the largest gradient of the same tensor."""
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in got)


def test_pipeline_bf16_trains_like_the_fsdp_bf16_run(tmp_path):
    runs = ok(run_ranks(bf16_worker, 2, tmp=tmp_path, timeout=300))
    fp32, fp32_grads, _ = single_process(2, steps=BF16_STEPS, clip=None)
    for r in runs:
        assert r["pipelined"] == pytest.approx(r["fsdp"], abs=BF16_LOSS_TOLERANCE)
        assert bf16_error(r["grads"], r["fsdp_grads"]) < BF16_GRAD_TOLERANCE
        assert bf16_error(r["grads"], fp32_grads[0]) < 2 * BF16_GRAD_TOLERANCE
        assert r["pipelined"] != pytest.approx(fp32, abs=1e-6)  # the stages really computed in bf16
        assert r["master_dtypes"] == {torch.float32}  # the master weights (and AdamW) stay fp32
    assert runs[0]["sent"] == [torch.bfloat16]  # the activations cross the stage boundary in bf16


def test_split_layers_gives_each_stage_an_equal_consecutive_share():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]


def test_a_cut_stage_computes_what_the_full_model_computes():
    model = tiny_model("tiny-gqa", n_layers=4).eval()
    tokens = torch.randint(0, 256, (2, 12))
    first, last = cut_stage(model, range(0, 2), True, False), cut_stage(model, range(2, 4), False, True)
    torch.testing.assert_close(last(first(tokens)), model(tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, words", [
    ({"pp": 3}, ["2 layers do not split into 3 pipeline stages", "--pp among [1, 2]"]),
    ({"pp": 2, "schedule": "interleaved"}, ["into 4 pipeline stages", "2 per rank", "--pp among [1]"]),
    ({"pp": 2, "world": 3}, ["3 ranks do not split into pipelines of 2 stages", "multiple of --pp"]),
    ({"pp": 2, "world": 4, "batch_size": 6}, ["--batch-size 6 does not split into 2", "x 2 micro-batches",
                                              "multiple of 4"]),
    ({"pp": 2, "microbatches": 0}, ["0 micro-batches"]),
    ({"pp": 2, "schedule": "zigzag"}, ["unknown pipeline schedule 'zigzag'", "gpipe, 1f1b, interleaved"]),
    ({"pp": 2, "microbatches": 3, "batch_size": 6, "n_layers": 4, "schedule": "interleaved"},
     ["rounds of 2", "multiple of --pp 2 micro-batches"]),
    ({"pp": 2, "config": "tiny-mqa"}, ["tiny-mqa ties the head to the embedding", "untied embeddings"]),
    ({"pp": 0}, ["--pp 0", "use --pp 1"]),
    ({"pp": 2, "tp": 2, "world": 6}, ["6 ranks do not split into pipelines of 2 stages x --tp 2", "--pp x --tp = 4"]),
    ({"pp": 2, "tp": 2, "world": 4, "batch_size": 3}, ["--batch-size 3 does not split into 1 data-parallel"]),
    ({"pp": 2, "cp": 2, "tp": 2, "world": 4}, ["4 ranks do not split into pipelines of 2 stages x --cp 2 x --tp 2 "
                                               "ranks each", "multiple of --pp x --cp x --tp = 8 ranks"]),
    ({"pp": 2, "cp": 2, "world": 8, "batch_size": 4, "microbatches": 4},
     ["--batch-size 4 does not split into 2 data-parallel replica(s) x 4"]),  # the ring ranks share their rows
])
def test_bad_pipeline_options_are_one_clear_error(kwargs, words):
    cfg = LlamaConfig.from_name(kwargs.pop("config", "tiny-gqa"), n_layers=kwargs.pop("n_layers", 2))
    args = {"world": 2, "pp": 2, "schedule": "1f1b", "batch_size": 8, "microbatches": 2, **kwargs}
    with pytest.raises(ValueError) as e:
        check_pipeline_args(cfg, **args)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_tied_head_cannot_be_cut():
    with pytest.raises(ValueError, match="tied head"):
        cut_stage(tiny_model("tiny-mqa"), range(0, 1), True, False)


def test_a_pytorch_whose_schedules_sum_the_micro_batch_gradients_is_refused(monkeypatch):
    import minllama.dist.pipeline as pipeline

    class OldSchedule:  # an older PyTorch's schedule signature: no scale_grads
        def __init__(self, stage, n_microbatches, loss_fn=None):
            raise AssertionError("never built")

    monkeypatch.setitem(pipeline.SCHEDULES, "1f1b", OldSchedule)
    with pytest.raises(RuntimeError, match="do not average gradients over micro-batches.*PyTorch 2.7 or newer"):
        build_pipeline(tiny_model(), mesh=None, device=CPU, schedule="1f1b")
