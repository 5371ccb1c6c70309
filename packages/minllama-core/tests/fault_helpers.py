"""Fault injection for the loaders: damage a real checkpoint in many ways, load each damaged copy, and sort the outcome.

Allowed outcomes of one case:

* ``clear error``: one CheckpointError with a message (never another exception type, never a traceback);
* ``loaded identical``: the model loads with every weight bit-exact and the same config, so its logits equal the
  undamaged model's;
* ``loaded as configured``: every weight bit-exact, and the config differs only in fields that size no tensor
  (CONFIG_ONLY: norm epsilon, rope theta and scaling, context length). The weights cannot tell whether such a value
  is right: the loader documents that it uses them as written. The logits must then equal the undamaged weights run
  under the loaded config. ``tie_embeddings`` may differ as well when the head holds the embedding's very numbers
  (a file storing a copy of the embedding as its head is an untied model with the same weights).

* ``loaded as documented``: a case may name the one different model the format defines for it (``documented``:
  a check of the loaded model), e.g. a GGUF file without output.weight is a tied model (llama.cpp's rule too).

Anything else is a defect: another exception type, different weights, a changed shape-defining field, or a warning
the loader does not document (``warn_ok`` lists the documented ones; such a case counts as ``documented warning``
and must still load identical or as configured). ``FAULT_TRACE=1`` prints every case and its outcome.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from minllama.core.checkpoint import CheckpointError
from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama

TOKENS = torch.arange(2, 26).view(2, 12)
CONFIG_ONLY = {"norm_eps", "rope_theta", "rope_scaling", "max_seq_len"}  # fields that size no tensor
SHAPE_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig) if f.compare} - CONFIG_ONLY
AS_CONFIGURED = CONFIG_ONLY | {"tie_embeddings"}  # (the weights, bit-exact, are checked separately)

# Values of the wrong type or out of range, put in every config field in turn.
BAD_VALUES = {"null": None, "numeric string": "64", "word": "wide", "NaN": math.nan, "inf": math.inf,
              "negative": -1, "zero": 0, "fraction": 0.5, "huge int": 2 ** 62, "huge float": 1e300, "true": True,
              "list": [64], "dict": {"v": 64}}


def perturbed_model(name: str, seed: int = 0, **overrides) -> MinimalLlama:
    """A tiny model whose norms are random too (init_weights sets them to 1: every seed would share them, and a
    replicated tensor that is the same in every model cannot reveal a shard from another model)."""
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def offsets(size: int, rng: random.Random, n: int, boundaries: tuple[int, ...] = ()) -> list[int]:
    """``n`` sampled offsets in [0, size), always including the first bytes, the last ones and ``boundaries``
    (with their neighbours)."""
    fixed = {0, 1, 2, 3, 4, 7, 8, 9, size - 1, size - 2} | {b + d for b in boundaries for d in (-1, 0, 1)}
    picked = {o for o in fixed if 0 <= o < size}
    while len(picked) < min(size, n + len(fixed)):
        picked.add(rng.randrange(size))
    return sorted(picked)


class FaultSuite:
    """Runs damage cases against one loader and one undamaged checkpoint; ``report()`` prints the counts and fails
    on any defect."""

    def __init__(self, name: str, reference: MinimalLlama, pristine: Path, load: Callable[[Path], MinimalLlama],
                 work: Path, warn_ok: str | None = None):
        self.name, self.pristine, self.load, self.work = name, pristine, load, work
        self.ref_state = {k: v.clone() for k, v in reference.state_dict().items()}
        self.ref_config = reference.config
        with torch.no_grad():
            self.ref_logits = reference.eval()(TOKENS)
        self.warn_ok = re.compile(warn_ok) if warn_ok else None
        self.counts: Counter = Counter()
        self.as_configured: Counter = Counter()
        self.defects: list[str] = []
        self.slowest: list[tuple[float, str]] = []
        self.started = time.perf_counter()
        self.check_undamaged()

    def target(self) -> Path:
        """A fresh copy of the undamaged checkpoint, to be damaged (a file or a folder, like the original)."""
        target = self.work / self.pristine.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if self.pristine.is_dir():
            shutil.copytree(self.pristine, target)
        else:
            self.work.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.pristine, target)
        return target

    def check_undamaged(self) -> None:
        model = self.load(self.target())
        assert self._weights_equal(model) and model.config == self.ref_config, "the undamaged checkpoint must load"

    def _weights_equal(self, model) -> bool:
        got = model.state_dict()
        return got.keys() == self.ref_state.keys() and all(
            got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
            for k, v in self.ref_state.items())

    def case(self, label: str, damage: Callable[[Path], object],
             documented: Callable[[MinimalLlama], bool] | None = None) -> str:
        """Damage a fresh copy with ``damage(path)``, load it, and record the outcome (returned)."""
        path = self.target()
        damage(path)
        start = time.perf_counter()
        outcome = self._outcome(label, path, documented)
        self.slowest = sorted(self.slowest + [(time.perf_counter() - start, label)], reverse=True)[:3]
        if os.environ.get("FAULT_TRACE"):
            print(f"[{self.name}] {outcome}: {label}", flush=True)
        self.counts["cases"] += 1
        self.counts[outcome] += 1
        return outcome

    def _outcome(self, label: str, path: Path, documented=None) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = self.load(path)
            except CheckpointError as e:
                message = str(e)
                if not message.strip() or "Traceback" in message or len(message) > 2000:
                    return self._defect(label, f"unhelpful CheckpointError message: {message[:300]!r}")
                return "clear error"
            except Exception as e:  # noqa: BLE001 (the point: any other exception type is a defect)
                return self._defect(label, f"{type(e).__name__}: {str(e)[:300]}")
        ours = [w for w in caught if self.warn_ok and self.warn_ok.search(str(w.message))]
        others = [w for w in caught if w not in ours]
        if others:
            return self._defect(label, f"undocumented warning: {others[0].category.__name__}: {others[0].message}")
        if not self._weights_equal(model):
            if documented is not None and documented(model):
                return "loaded as documented"
            return self._defect(label, "LOADED WITH DIFFERENT WEIGHTS")
        changed = {f for f in SHAPE_FIELDS | CONFIG_ONLY
                   if getattr(model.config, f) != getattr(self.ref_config, f)}
        with torch.no_grad():
            logits = model(TOKENS)
        if not changed:
            if not torch.equal(logits, self.ref_logits):
                return self._defect(label, "same weights and config, other logits")
            return "documented warning" if ours else "loaded identical"
        if changed - AS_CONFIGURED:
            return self._defect(label, f"loaded with a changed shape-defining field {sorted(changed - AS_CONFIGURED)}")
        with torch.no_grad():  # the undamaged weights under the loaded config: what the loader says it gives
            expected = MinimalLlama(model.config)
            expected.load_state_dict(self.ref_state)
            want = expected.eval()(TOKENS)
        if not torch.equal(logits, want):
            return self._defect(label, f"config changed in {sorted(changed)} and logits differ beyond that")
        self.as_configured.update(changed)
        return "documented warning" if ours else "loaded as configured"

    def _defect(self, label: str, what: str) -> str:
        self.defects.append(f"{label}: {what}")
        return "DEFECT"

    def report(self, min_errors: int = 1, min_loaded: int = 1) -> None:
        c = self.counts
        loaded = c["loaded identical"] + c["loaded as configured"] + c["documented warning"] + \
            c["loaded as documented"]
        print(f"\n{self.name}: {c['cases']} cases in {time.perf_counter() - self.started:.1f} s: "
              f"{c['clear error']} clear errors, {c['loaded identical']} loaded identical, "
              f"{c['loaded as configured']} loaded as configured ({dict(self.as_configured)}), "
              f"{c['loaded as documented']} loaded as documented, {c['documented warning']} documented warnings, "
              f"{c['DEFECT']} defects; slowest: "
              + ", ".join(f"{label} {t:.2f} s" for t, label in self.slowest))
        assert not self.defects, f"{len(self.defects)} defects:\n" + "\n".join(self.defects[:40])
        assert c["clear error"] >= min_errors and loaded >= min_loaded, c  # the suite exercised both sides
