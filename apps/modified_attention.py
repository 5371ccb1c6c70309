"""Differential attention as a MinimalLlama subclass, trained from scratch next to the standard Llama.

    uv run apps/modified_attention.py                          # a few minutes on a CPU; writes out/modified_attention/
    uv run apps/modified_attention.py --steps 5 --out /tmp/da  # a smoke run in seconds

The idea (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258): softmax attention spreads some weight over
every irrelevant token ("attention noise"). Differential attention computes *two* softmax maps from two halves of
each head's queries and keys and subtracts them, like a differential amplifier cancels common-mode noise:

    DiffAttn(X) = (softmax(Q1 K1ᵀ / √d) - λ · softmax(Q2 K2ᵀ / √d)) · V
    λ = exp(λq1 · λk1) - exp(λq2 · λk2) + λ_init,      λ_init = 0.8 - 0.6 · exp(-0.3 · layer_index)

Each head's output is normalized on its own (RMSNorm over its channels, the paper's "GroupNorm") and multiplied by
(1 - λ_init), so that the gradients match the standard Transformer's at the start of training.

What changes against ``minllama.core.model.Attention``: one step, ``attend``. With ``h = n_heads / 2``
differential heads, standard query heads 2j and 2j+1 become Q1 and Q2 of differential head j (the even and the odd
heads), likewise for the keys, and each differential head reads values of ``2 · head_dim`` channels (standard value
heads 2j and 2j+1 side by side). So ``wq, wk, wv, wo`` keep their names and shapes, the projections, RoPE, grouped
queries and the KV cache (standard heads, as stored by core) are core's, and ``generate`` works as for any
MinimalLlama, with any cache.

The experiment: both models, same config, same initial seed, same batches (byte-level text: the docstrings of the
Python standard library installed with the interpreter, nothing downloaded), same optimizer and number of steps,
trained step by step in turn so that both see the same machine load. Outputs in ``--out``: ``loss_curves.png``,
``results.json``, ``analysis.txt``.
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minllama.core.checkpoint import atomic_write
from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.model import Attention, MinimalLlama, RMSNorm

from lr_schedule import lr_at  # apps/lr_schedule.py, beside this script


# ------------------------------------------------------------------------------------------------- the model
def lambda_init_for(layer_index: int) -> float:
    """The paper's depth schedule (layer_index from 0): deeper layers start with a stronger subtraction."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialAttention(Attention):
    """Attention whose map is the difference of two softmax maps (see the module docstring).

    Same ``wq, wk, wv, wo`` as ``Attention``; new parameters: the four λ vectors (head_dim each, shared by the
    heads of the layer, as in the paper) and the per-head RMSNorm ``subln`` (2 · head_dim)."""

    def __init__(self, cfg: LlamaConfig, layer_index: int = 0):
        super().__init__(cfg, layer_index)
        if cfg.n_heads % 2 or cfg.n_kv_heads % 2:
            raise ValueError(f"differential attention pairs heads: n_heads={cfg.n_heads} and "
                             f"n_kv_heads={cfg.n_kv_heads} must both be even (e.g. tiny-gqa or tiny-mha)")
        self.n_diff_heads, self.n_diff_kv_heads = cfg.n_heads // 2, cfg.n_kv_heads // 2
        d = cfg.head_dim
        self.lambda_q1 = nn.Parameter(torch.zeros(d))
        self.lambda_k1 = nn.Parameter(torch.zeros(d))
        self.lambda_q2 = nn.Parameter(torch.zeros(d))
        self.lambda_k2 = nn.Parameter(torch.zeros(d))
        self.lambda_init = lambda_init_for(layer_index)  # a constant of the layer: deeper layers subtract more
        self.subln = RMSNorm(2 * d, eps=cfg.norm_eps)

    def lam(self) -> Tensor:
        """λ, a scalar re-parameterized through exponentials so that it can learn fast and stay smooth."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, 2h, T, d), k, v (B, 2h_kv, S, d): standard heads, rotated (and cached) as usual -> (B, h, T, 2d),
        which core's ``project_out`` flattens to the same h · 2d = n_heads · d channels ``wo`` always reads."""
        # Differential head j pairs standard heads 2j (Q1, K1) and 2j+1 (Q2, K2); its values are both side by side.
        q1, q2, k1, k2 = q[:, 0::2], q[:, 1::2], k[:, 0::2], k[:, 1::2]  # (B, h, T, d), (B, h_kv, S, d)
        v = torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)  # (B, h_kv, S, 2d)
        attend = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=mask is None,
                                   enable_gqa=k1.shape[1] != q1.shape[1])
        # (A1 - λ A2) V = A1 V - λ A2 V: two fused attention calls instead of materializing the maps.
        y1 = attend(q1, k1, v)  # softmax(Q1 K1ᵀ / √d) V   (B, h, T, 2d)
        y2 = attend(q2, k2, v)  # softmax(Q2 K2ᵀ / √d) V
        return self.subln(y1 - self.lam() * y2) * (1 - self.lambda_init)  # per-head norm, then the fixed rescaling


class DiffLlama(MinimalLlama):
    """MinimalLlama with differential attention in every layer; embedding, FFN, head, generation unchanged."""

    attention_class = DifferentialAttention

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        for layer in self.layers:  # the paper's init: λ vectors ~ N(0, 0.1²), so λ starts close to λ_init
            a = layer.attention
            for p in (a.lambda_q1, a.lambda_k1, a.lambda_q2, a.lambda_k2):
                nn.init.normal_(p, mean=0.0, std=0.1)


# ------------------------------------------------------------------------------------------------ the corpus
@functools.lru_cache(maxsize=None)
def stdlib_docstrings(min_chars: int = 40) -> tuple[str, ...]:
    """The docstrings of the standard library's top-level modules (PSF licence), in a fixed order: real English
    prose about code, available offline wherever Python is."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    if not docs:
        raise RuntimeError(f"found no docstrings under {root}: is the Python standard library installed?")
    return tuple(docs)


def byte_corpus(val_every: int = 10) -> tuple[Tensor, Tensor]:
    """Byte-level token streams (vocab 256): every ``val_every``-th docstring goes to validation."""
    docs = stdlib_docstrings()
    train = "\n\n".join(d for i, d in enumerate(docs) if i % val_every)
    val = "\n\n".join(d for i, d in enumerate(docs) if i % val_every == 0)
    as_tensor = lambda s: torch.frombuffer(bytearray(s.encode("utf-8")), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val)


def random_windows(data: Tensor, batch: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``seq_len + 1`` bytes -> inputs and next-byte targets, (batch, seq_len) each."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


# -------------------------------------------------------------------------------------------- the experiment
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Differential-Transformer Llama and a standard Llama from "
                                            "scratch on the same data and budget; plot and compare.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/modified_attention", help="folder for loss_curves.png, results.json, "
                                                                    "analysis.txt")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps for each model")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--dim", type=int, default=96, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="standard query heads (the differential model has half as "
                                                       "many, each with two maps)")
    p.add_argument("--kv-heads", type=int, default=2, help="standard key/value heads (grouped-query attention)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warmup then cosine decay)")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every this many steps")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads: a model this small gains nothing from "
                                                          "more, and extra threads wait for each other (measured "
                                                          "on 2 shared cores at load 4: a 10-step smoke run took 9-12 s with 1 thread, 64-90 s with 2)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.eval_every < 1:
        p.error("--steps, --batch-size, --eval-every must be >= 1 and --seq-len >= 2")
    if args.heads % 2 or args.kv_heads % 2 or args.heads % args.kv_heads or args.dim % args.heads:
        p.error("--heads and --kv-heads must be even, --heads a multiple of --kv-heads, --dim a multiple of --heads")
    return args


def model_config(args) -> LlamaConfig:
    hidden = 64 * math.ceil(8 * args.dim / 3 / 64)  # SwiGLU's usual 8/3 · dim, rounded up to a multiple of 64
    return LlamaConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, hidden_dim=hidden, max_seq_len=max(256, args.seq_len),
                       name="modified-attention-experiment")


@torch.no_grad()
def val_loss(model: MinimalLlama, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    loss = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def plot(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, color in (("standard", "tab:blue"), ("differential", "tab:red")):
        h = history[name]
        ax.plot(h["train_steps"], h["train_smooth"], color=color, alpha=0.6, label=f"{name}: train (smoothed)")
        ax.plot(h["val_steps"], h["val"], "o-", color=color, label=f"{name}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("Differential vs standard attention, same data and budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (the first values are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    train_data, val_data = byte_corpus()
    print(f"corpus: {train_data.numel():,} train bytes, {val_data.numel():,} validation bytes "
          f"(standard-library docstrings)")

    models = {}
    for name, cls in (("standard", MinimalLlama), ("differential", DiffLlama)):
        models[name] = cls(cfg)
        torch.manual_seed(args.seed)  # same seed right before the init: every shared weight starts identical
        models[name].init_weights()
        models[name].train()
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
                  for n, m in models.items()}
    g_val = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [random_windows(val_data, args.batch_size, args.seq_len, g_val) for _ in range(args.eval_batches)]
    history = {n: {"train": [], "train_steps": [], "val": [], "val_steps": [], "seconds": 0.0} for n in models}
    g_train = torch.Generator().manual_seed(args.seed + 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} bytes; load average at start {load:.2f}")

    for step in range(args.steps):
        x, y = random_windows(train_data, args.batch_size, args.seq_len, g_train)  # one batch, both models
        for name, model in models.items():
            opt = optimizers[name]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr)
            start = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history[name]["seconds"] += time.perf_counter() - start
            history[name]["train"].append(loss.item())
            history[name]["train_steps"].append(step + 1)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            msg = []
            for name, model in models.items():
                history[name]["val"].append(val_loss(model, val_batches))
                history[name]["val_steps"].append(step + 1)
                msg.append(f"{name} train {history[name]['train'][-1]:.3f} val {history[name]['val'][-1]:.3f}")
            print(f"step {step + 1:5d}/{args.steps}: " + " | ".join(msg), flush=True)

    tokens = args.steps * args.batch_size * args.seq_len
    results = {"config": cfg.to_dict(), "args": vars(args), "tokens_per_model": tokens,
               "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for name, model in models.items():
        h = history[name]
        h["train_smooth"] = smooth(h["train"])
        tail = h["train"][-max(1, len(h["train"]) // 10):]
        results[name] = {"params": model.num_params(), "final_train_loss": sum(tail) / len(tail),
                         "final_val_loss": h["val"][-1], "tokens_per_s": tokens / h["seconds"],
                         "train_seconds": h["seconds"]}
    results["differential"]["lambda_per_layer"] = [round(layer.attention.lam().item(), 4)
                                                   for layer in models["differential"].layers]
    prompt = list(b"Return the ")
    for name, model in models.items():  # greedy continuation through the KV cache: generation works unchanged
        model.eval()
        sample = generate(model, [prompt], max_new_tokens=60)[0]
        results[name]["sample"] = bytes(prompt + sample).decode("utf-8", errors="replace")

    analysis = analyse(results)
    print(analysis)
    plot(history, out / "loss_curves.png")
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {**results, "history": {n: {k: v for k, v in h.items() if k != "train_smooth"} for n, h in history.items()}},
        indent=1) + "\n"))
    atomic_write(out / "analysis.txt", lambda tmp: Path(tmp).write_text(analysis + "\n"))
    print(f"wrote {out / 'loss_curves.png'}, {out / 'results.json'}, {out / 'analysis.txt'}")
    return results


def analyse(results: dict) -> str:
    s, d = results["standard"], results["differential"]
    bits = 1 / math.log(2)
    lines = [
        f"{'':14s} {'params':>9s} {'train loss':>10s} {'val loss':>9s} {'val bits/byte':>13s} {'tokens/s':>9s}",
        *(f"{name:14s} {r['params']:9,d} {r['final_train_loss']:10.4f} {r['final_val_loss']:9.4f} "
          f"{r['final_val_loss'] * bits:13.3f} {r['tokens_per_s']:9.0f}" for name, r in (("standard", s),
                                                                                       ("differential", d))),
        "",
        f"validation loss, differential - standard: {d['final_val_loss'] - s['final_val_loss']:+.4f} nats/byte "
        f"({(d['final_val_loss'] / s['final_val_loss'] - 1) * 100:+.1f}%)",
        f"extra parameters of differential attention: {d['params'] - s['params']:,} (λ vectors and per-head norms)",
        f"speed, differential / standard: {d['tokens_per_s'] / s['tokens_per_s']:.2f}x (two attention calls per "
        f"layer instead of one; the load average was {results['load_average_end']:.2f}, so timings are noisy)",
        f"learned λ per layer: {d['lambda_per_layer']}",
        f"standard sample:     {s['sample']!r}",
        f"differential sample: {d['sample']!r}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
