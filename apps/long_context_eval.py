"""Long-context evaluation: perplexity vs context length and passkey retrieval for the base model and every RoPE
scaling method of minllama-extend, and streaming (attention sinks) against a plain sliding window.

    uv run apps/long_context_eval.py                       # the embedded SmolLM2 on a CPU: about 5 minutes
    uv run apps/long_context_eval.py --quick --out /tmp/e  # a smoke run in seconds (tiny lengths)
    uv run apps/long_context_eval.py --device cuda --original 8192 --lengths 4096 8192 16384 32768

SmolLM2-135M was trained with an 8192-token context, far beyond what a shared CPU evaluates in minutes. So by
default every method is applied as if the model had been trained on ``--original`` = 512 tokens (factor 4: a
2048-token context), and the curves show what each method costs *inside* the range the model knows: linear
interpolation blurs local order at every length, NTK and YaRN much less, dynamic NTK nothing up to 512.
On a GPU, ``--original 8192`` with lengths past 8192 measures the extension itself.

The defaults take about 5 minutes on 2 busy CPU cores (an estimate: one method at the default lengths took 43 s,
times 6 methods, plus the streaming runs). Text: the docstrings of the Python standard library installed with the
interpreter (nothing downloaded).
Outputs in ``--out``: ``long_context_eval.png`` and ``results.json``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minllama.core.checkpoint import load_pretrained
from minllama.core.generate import generate
from minllama.extend.rope_scaling import METHODS, scale_rope, unscale_rope
from minllama.extend.streaming import SinkKVCache, streaming_forward

THREADS_DEFAULT = 1
THREADS_HELP = ("torch CPU threads (0: PyTorch's default, one per core). Measured on 2 cores shared at load 4, one "
                "method (base, default lengths) took {one} s with 1 thread and {two} s with 2")
STDLIB_MODULES = ["argparse", "collections", "subprocess", "logging", "json", "pathlib", "functools", "inspect",
                  "threading", "tarfile", "zipfile", "typing", "email", "unittest", "doctest", "decimal"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="model name, GGUF file or checkpoint dir")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="context lengths")
    p.add_argument("--original", type=int, default=512, help="context the methods treat as the trained one")
    p.add_argument("--factor", type=float, default=4.0, help="context extension factor of every method")
    p.add_argument("--methods", nargs="+", default=["base", *METHODS], choices=["base", *METHODS])
    p.add_argument("--passkey-trials", type=int, default=2, help="passkey prompts per (method, length)")
    p.add_argument("--stream-tokens", type=int, default=1536, help="tokens for the sinks vs sliding-window run")
    p.add_argument("--window", type=int, default=252, help="rolling window of the streaming run")
    p.add_argument("--n-sink", type=int, default=4, help="attention sinks of the streaming run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=THREADS_DEFAULT, help=THREADS_HELP.format(one=43, two=143))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny lengths, 1 trial, short streaming run")
    p.add_argument("--out", default="out/long_context_eval", help="output directory")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.original, args.passkey_trials = [64, 128], 64, 1
        args.stream_tokens, args.window, args.n_sink = 160, 60, 4
    return args


def stdlib_text() -> str:
    """Docstrings of a fixed list of standard-library modules: plain English prose that ships with Python."""
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor) -> float:
    """Average next-token negative log-likelihood over a (1, L + 1) window."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits[0].float(), ids[0, 1:]).item()


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer, length: int, rng: random.Random) -> tuple[list[int], str]:
    """The passkey test of Mohtashami & Jaggi (2023): a number hidden at a random depth in ``length`` tokens of
    repeated filler; the model must complete "The pass key is" with it."""
    key = str(rng.randint(10000, 99999))
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    budget = length - len(tokenizer.encode(head + needle + question))
    n_fill = max(budget // len(tokenizer.encode(FILLER)), 1)
    depth = rng.randint(0, n_fill)
    text = head + FILLER * depth + needle + FILLER * (n_fill - depth) + question
    return tokenizer.encode(text), key


def apply_method(model, method: str, args, max_len: int):
    if method == "base":  # plain RoPE, its table grown if needed (extrapolation)
        return scale_rope(model, "linear", 1.0, max_seq_len=max(max_len, model.config.max_seq_len))
    return scale_rope(model, method, args.factor, original_max_seq_len=args.original,
                      max_seq_len=max(max_len, int(args.factor * args.original), model.config.max_seq_len))


@torch.no_grad()
def streaming_nll(model, ids: torch.Tensor, n_sink: int, window: int, chunk: int = 16, desc: str = "") -> list[float]:
    """Per-token NLL of a long text fed through a rolling cache in chunks."""
    from tqdm import tqdm

    cache, out = SinkKVCache(model, n_sink, window), []
    for i in tqdm(range(0, ids.shape[1] - 1, chunk), desc=desc, unit="chunk", leave=False):
        x, y = ids[:, i:i + chunk], ids[:, i + 1:i + chunk + 1]
        logits = streaming_forward(model, cache, x[:, :y.shape[1]])
        out += F.cross_entropy(logits[0].float(), y[0], reduction="none").tolist()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.checkpoint} ...", flush=True)
    try:
        model, tokenizer = load_pretrained(args.checkpoint, device=args.device)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} (timings are noisy when the machine is shared)")
    ids = torch.tensor([tokenizer.encode(stdlib_text())], device=args.device)
    need = max(max(args.lengths) + 1, args.stream_tokens)
    if ids.shape[1] < need:
        ids = ids.repeat(1, need // ids.shape[1] + 1)
    results: dict = {"args": vars(args), "perplexity": {}, "passkey": {}, "streaming": {}}
    original_len = model.config.max_seq_len
    for method in args.methods:
        start = time.perf_counter()
        apply_method(model, method, args, max(args.lengths) + 16)
        # one bar per method: a perplexity pass and the passkey prompts at each length (longest last: slowest)
        bar = tqdm(total=len(args.lengths) * (1 + args.passkey_trials), desc=method, unit="pass", leave=False)
        ppl, rng, acc = {}, random.Random(0), {}
        for L in args.lengths:
            ppl[L] = math.exp(mean_nll(model, ids[:, :L + 1]))
            bar.update()
        for L in args.lengths:
            hits = 0
            for _ in range(args.passkey_trials):
                prompt, key = passkey_prompt(tokenizer, L, rng)
                answer = tokenizer.decode(generate(model, [prompt], 8)[0])
                hits += key in answer
                bar.update()
            acc[L] = hits / args.passkey_trials
        bar.close()
        unscale_rope(model, max_seq_len=original_len)
        results["perplexity"][method], results["passkey"][method] = ppl, acc
        print(f"{method:>8}: perplexity " + "  ".join(f"{L}: {p:7.2f}" for L, p in ppl.items()) +
              " | passkey " + "  ".join(f"{L}: {a:.0%}" for L, a in acc.items()) +
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    n = args.stream_tokens
    for label, n_sink, window in [("sinks", args.n_sink, args.window), ("window only", 0, args.window + args.n_sink)]:
        nll = streaming_nll(model, ids[:, :n + 1], n_sink, window, desc=f"streaming, {label}")
        results["streaming"][label] = nll
        tail = nll[window + n_sink:]
        print(f"streaming {label:>11} ({n_sink} sinks + {window}): perplexity after the window fills "
              f"{math.exp(sum(tail) / max(len(tail), 1)):.2f}")
    print(f"(full cache: one forward pass over {n} tokens ...)", file=sys.stderr, flush=True)
    with torch.no_grad():
        full = F.cross_entropy(model(ids[:, :n])[0].float(), ids[0, 1:n + 1], reduction="none").tolist()
    results["streaming"]["full cache"] = full
    tail = full[args.window + args.n_sink:]
    print(f"streaming   full cache: perplexity over the same tokens {math.exp(sum(tail) / max(len(tail), 1)):.2f}")

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plt_close(plot(results, args, out / "long_context_eval.png"))
    print(f"wrote {out / 'long_context_eval.png'} and {out / 'results.json'}")
    return 0


def plt_close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot(results: dict, args, path: Path):
    """The three panels, saved to ``path``; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    # curves that coincide (dynamic NTK is the base model up to its original length) stay visible: each method
    # gets its own marker and line style, and the later ones are drawn hollow on top of the earlier ones
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "--"), ("x", "-.")]
    for i, (method, ppl) in enumerate(results["perplexity"].items()):
        marker, line = styles[i % len(styles)]
        axes[0].plot([int(L) for L in ppl], list(ppl.values()), marker=marker, ls=line, label=method,
                     markerfacecolor="none" if i else None, markersize=7 - i * 0.5)
    axes[0].axvline(args.original, color="gray", ls=":", label="'trained' length")
    axes[0].set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
                title="Perplexity vs length")
    axes[0].set_xticks(args.lengths, [str(L) for L in args.lengths])  # the lengths measured, not 3×10²
    axes[0].xaxis.set_minor_locator(NullLocator())
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(ScalarFormatter())
    width = 0.8 / max(len(results["passkey"]), 1)
    for i, (method, acc) in enumerate(results["passkey"].items()):
        axes[1].bar([j + i * width for j in range(len(acc))], list(acc.values()), width, label=method)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(args.lengths))], [str(L) for L in args.lengths])
    axes[1].set(xlabel="prompt length (tokens)", ylabel="accuracy", ylim=(0, 1.05), title="Passkey retrieval")
    for label, nll in results["streaming"].items():
        k = 64  # moving average
        smooth = [sum(nll[max(0, i - k):i + 1]) / len(nll[max(0, i - k):i + 1]) for i in range(len(nll))]
        axes[2].plot([math.exp(s) for s in smooth], label=label)
    axes[2].axvline(args.window + args.n_sink, color="gray", ls=":", label="cache full")
    axes[2].set(yscale="log", xlabel="token", ylabel="perplexity (moving average)", title="Streaming")
    axes[2].yaxis.set_major_formatter(ScalarFormatter())
    for ax in axes:  # below each plot, never over a curve or a bar
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return fig


if __name__ == "__main__":
    sys.exit(main())
