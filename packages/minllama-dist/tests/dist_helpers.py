"""Run a function on N forked ranks of a gloo group and collect what each returns (never hangs: timeouts)."""
from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from minllama.core import LlamaConfig, MinimalLlama
from minllama.dist.launch import free_port

GROUP_TIMEOUT = timedelta(seconds=60)  # a collective waiting longer than this raises instead of hanging


def tiny_model(name: str = "tiny-gqa", seed: int = 0, **overrides) -> MinimalLlama:
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    return model


def as_full(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one plain tensor, whatever the layout (DTensor: gathered, a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a gathered copy of every gradient it is asked to apply (after clipping), by parameter name:
    what the distributed tests compare with one process."""

    def __init__(self, model, **kw):
        self.named = list(model.named_parameters())
        self.seen: list[dict] = []
        super().__init__([p for _, p in self.named], **kw)

    def step(self, closure=None):
        self.seen.append({n: as_full(p.grad) for n, p in self.named})  # full_tensor: a collective
        return super().step(closure)


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MINLLAMA_DEVICE="cpu")
    torch.set_num_threads(1)
    result_file = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, result_file)
    except BaseException as e:  # report the error to the parent instead of a bare exit code
        torch.save({"error": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                    "trace": traceback.format_exc()}, result_file)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, tmp: Path, timeout: float = 120.0) -> list:
    """fn(rank, world, *args) on ``world`` forked processes; returns the per-rank results (or raises).

    A rank's exception comes back as {"error": ..., "type": ...} in its slot, so tests can assert on errors.
    The whole run is killed after ``timeout`` seconds: a hang fails the test.
    """
    out = Path(tmp) / f"ranks-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), str(out), fn, args), nprocs=world, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout}s (hang)")
    results = []
    for r in range(world):
        if not (out / f"rank{r}.pt").is_file():  # killed, or os._exit: a test of a rank that dies
            results.append({"error": f"rank {r} exited without a result", "type": "died"})
            continue
        got = torch.load(out / f"rank{r}.pt", weights_only=False)
        results.append(got.get("ok", got))
    return results


def ok(results: list) -> list:
    """The results, or an AssertionError with the first rank's traceback."""
    for r in results:
        if isinstance(r, dict) and "error" in r and "trace" in r:
            raise AssertionError(r["trace"])
    return results
