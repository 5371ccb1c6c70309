"""The estimator (minllama.dist.estimate) against what ranks actually hold and send, on tiny models."""
from __future__ import annotations

import pytest
import torch
from dist_helpers import ok, run_ranks

from minllama.core import LlamaConfig, MinimalLlama
from minllama.dist import lm_loss
from minllama.dist.estimate import Layout, estimate, main, table
from minllama.dist.measure import SavedActivations, measure_step

BATCH, SEQ = 4, 32


def saved_activation_bytes(model, tokens) -> int:
    with SavedActivations() as saved:
        lm_loss(model(tokens[:, :-1]), tokens)
    return saved.bytes(model)


def test_activations_of_one_process_match_the_formula():
    cfg = LlamaConfig.from_name("tiny-gqa", n_layers=3)
    torch.manual_seed(0)
    model = MinimalLlama(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    measured = saved_activation_bytes(model, tokens)
    est = estimate(cfg, Layout(), BATCH, SEQ)
    assert est.activations == pytest.approx(measured, rel=0.10)
    assert est.params == sum(p.numel() for p in model.parameters()) * 4


def _measure(rank, world, cfg, layout):
    return measure_step(cfg, layout, BATCH, SEQ)


LAYOUTS = [Layout(dp_shard=4), Layout(tp=2, dp_shard=2), Layout(pp=2, dp_shard=2), Layout(cp=2, dp_shard=2),
           Layout(tp=4), Layout(dp_shard=4, activation_checkpointing=True),
           Layout(tp=2, dp_shard=2, activation_checkpointing=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name.replace(" ", ""))
def test_estimate_matches_what_four_ranks_hold_and_send(tmp_path, layout):
    """Held bytes exactly; activations and bytes sent (in total, and FSDP's per collective) within 10%."""
    cfg = LlamaConfig.from_name("tiny-mha" if layout.tp == 4 else "tiny-gqa", n_layers=4)  # tp 4: 4 kv heads
    est = estimate(cfg, layout, BATCH, SEQ)
    got = ok(run_ranks(_measure, 4, cfg, layout, tmp=tmp_path))[0]  # rank 0: the first pipeline stage
    assert (got["params"], got["grads"], got["optim"]) == (est.params, est.grads, est.optim)
    assert got["activations"] == pytest.approx(est.activations, rel=0.10)
    assert sum(got["sent"].values()) == pytest.approx(sum(est.comm.values()), rel=0.10)
    if layout.tp == 1:  # then every all-gather and reduce-scatter is FSDP's
        assert got["sent"]["all-gather"] == pytest.approx(est.comm["FSDP all-gather"], rel=0.10)
        assert got["sent"]["reduce-scatter"] == pytest.approx(est.comm["FSDP reduce-scatter"], rel=0.10)
    for kind, name in (("send/recv", "PP send/recv"), ("send/recv", "CP ring k/v")):
        if name in est.comm:
            assert got["sent"][kind] == pytest.approx(est.comm[name], rel=0.10)


def test_bad_layout_is_one_clear_error():
    cfg = LlamaConfig.from_name("tiny-gqa")
    with pytest.raises(ValueError, match="does not split over --tp 3"):
        estimate(cfg, Layout(tp=3), BATCH, SEQ)
    with pytest.raises(ValueError, match="batch 3 does not split over dp_shard=2"):
        estimate(cfg, Layout(dp_shard=2), 3, SEQ)


def test_a_budget_nothing_fits_names_the_smallest_need(capsys):
    cfg = LlamaConfig.from_name("tiny-gqa")
    with pytest.raises(ValueError, match=r"fits 0.00 GiB per rank: the smallest needs 0.\d+ GiB"):
        table(cfg, world=4, batch=4, seq_len=SEQ, budget=1024)
    with pytest.raises(SystemExit):
        main(["--config", "tiny-gqa", "--world", "0"])
    assert "--world 0" in capsys.readouterr().err


def _measure_tp_and_pp(rank, world):
    return measure_step(LlamaConfig.from_name("tiny-gqa", n_layers=4), Layout(pp=2, tp=2), BATCH, SEQ)


def test_measuring_a_layout_this_version_cannot_build_is_one_clear_error(tmp_path):
    got = run_ranks(_measure_tp_and_pp, 4, tmp=tmp_path)[0]
    assert got["type"] == "ValueError" and "not with each other" in got["error"]


def test_cli_prints_layouts_that_fit(capsys):
    main(["--config", "tiny-gqa", "--world", "4", "--batch", "4", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert "FSDP 4" in out and "tp 2 x FSDP 2" in out and "pp 2 x FSDP 2" in out
