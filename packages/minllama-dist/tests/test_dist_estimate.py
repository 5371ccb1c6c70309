"""The estimator (minllama.dist.estimate) against what ranks actually hold and send, on tiny models."""
from __future__ import annotations

import pytest
import torch
from dist_helpers import ok, run_ranks

from minllama.core import LlamaConfig, MinimalLlama
from minllama.dist import apply_fsdp, data_parallel_mesh, lm_loss, materialize, meta_model
from minllama.dist.estimate import Layout, estimate, main
from minllama.dist.traffic import CountedTraffic

BATCH, SEQ = 4, 32


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def saved_activation_bytes(model, tokens) -> tuple[int, torch.Tensor]:
    """Bytes of the unique storages autograd saves for backward, weights excluded, counted after the forward: FSDP2
    saves its gathered weights too, but frees their storage (size 0) when it reshards, so they count 0 then."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model(tokens[:, :-1]), tokens)
    weights = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *model.buffers()]]
    own = {t.untyped_storage().data_ptr() for t in weights}
    return sum(s.nbytes() for ptr, s in seen.items() if ptr not in own), loss


def test_activations_of_one_process_match_the_formula():
    cfg = LlamaConfig.from_name("tiny-gqa", n_layers=3)
    torch.manual_seed(0)
    model = MinimalLlama(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    measured, _ = saved_activation_bytes(model, tokens)
    est = estimate(cfg, Layout(), BATCH, SEQ)
    assert est.activations == pytest.approx(measured, rel=0.10)
    assert est.params == sum(p.numel() for p in model.parameters()) * 4


def _fsdp_step(rank, world):
    cfg = LlamaConfig.from_name("tiny-gqa", n_layers=3)
    model = apply_fsdp(meta_model(cfg), data_parallel_mesh(torch.device("cpu")), prefetch=0)
    materialize(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    torch.manual_seed(rank)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH // world, SEQ + 1))
    with CountedTraffic() as traffic:
        acts, loss = saved_activation_bytes(model, tokens)
        loss.backward()
    grads = local_bytes(p.grad for p in model.parameters())
    opt.step()
    optim = local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": local_bytes(model.parameters()), "grads": grads, "optim": optim, "acts": acts,
            **traffic.sent}


def test_fsdp_memory_and_traffic_match_the_estimate(tmp_path):
    world = 2
    cfg = LlamaConfig.from_name("tiny-gqa", n_layers=3)
    est = estimate(cfg, Layout(dp_shard=world), BATCH, SEQ)
    for got in ok(run_ranks(_fsdp_step, world, tmp=tmp_path)):
        assert (got["params"], got["grads"], got["optim"]) == (est.params, est.grads, est.optim)
        assert got["acts"] == pytest.approx(est.activations, rel=0.10)
        assert got["all-gather"] == pytest.approx(est.comm["FSDP all-gather"], rel=0.10)
        assert got["reduce-scatter"] == pytest.approx(est.comm["FSDP reduce-scatter"], rel=0.10)


def test_bad_layout_is_one_clear_error():
    cfg = LlamaConfig.from_name("tiny-gqa")
    with pytest.raises(ValueError, match="does not split over --tp 3"):
        estimate(cfg, Layout(tp=3), BATCH, SEQ)
    with pytest.raises(ValueError, match="batch 3 does not split over dp_shard=2"):
        estimate(cfg, Layout(dp_shard=2), 3, SEQ)


def test_cli_prints_layouts_that_fit(capsys):
    main(["--config", "tiny-gqa", "--world", "4", "--batch", "4", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert "FSDP 4" in out and "tp 2 x FSDP 2" in out and "pp 2 x FSDP 2" in out
