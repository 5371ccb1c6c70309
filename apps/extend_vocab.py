"""Extend the embedded SmolLM2's vocabulary for a domain (Python source code), on a CPU in minutes.

    uv run apps/extend_vocab.py                        # 256 new tokens, a short finetune of the new rows: ~1.5 min
    uv run apps/extend_vocab.py --quick --out /tmp/v   # a smoke run

Steps (see packages/minllama-extend/README.md): continue SmolLM2's byte-level BPE training on the first 80% of 16
Python files of the standard library (the last 20% held out): new tokens and merges appended after the old ones;
grow the embedding (tied head) with each new row = the mean of the old pieces it replaces; check that old-token
inputs give bit-identical logits; finetune only the new rows; save with ``save_hf`` (weights + tokenizer.json) and
load the result back.
Outputs in ``--out``: ``extended/`` (an HF checkpoint directory) and ``results.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minllama.core.checkpoint import load_pretrained, save_hf
from minllama.extend.vocab import extend_bpe, resize_vocab, train_only_new_rows

MODULES = ["argparse", "subprocess", "tarfile", "zipfile", "pathlib", "inspect", "threading", "logging",
           "functools", "typing", "dataclasses", "shutil", "tempfile", "configparser", "csv", "pickle"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="model name, GGUF file or checkpoint dir")
    p.add_argument("--new-tokens", type=int, default=256, help="how many tokens to add")
    p.add_argument("--steps", type=int, default=20, help="finetuning steps on the new rows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per finetuning step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: PyTorch's default, one per core). Measured on 2 cores shared at load "
                        "4: a finetuning step took 3.3 s with 1 thread, 9 s with 2")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 steps, few files")
    p.add_argument("--out", default="out/extend_vocab", help="output directory")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.steps, args.seq_len = 16, 2, 64
    return args


def module_source(names: list[str], held_out: float = 0.2) -> tuple[list[str], list[str]]:
    """The source of each module, split by lines: the first 80% to learn the new tokens, the rest held out (the
    same code base, text never seen: what a domain adaptation is for)."""
    train, test = [], []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            lines = Path(spec.origin).read_text(encoding="utf-8").splitlines(keepends=True)
            cut = int(len(lines) * (1 - held_out))
            train.append("".join(lines[:cut]))
            test.append("".join(lines[cut:]))
    return train, test


@torch.no_grad()
def old_part_unchanged(model, probe, before, old_n: int) -> bool:
    """The old tokens' logits, computed by the old rows of the (now larger) head, are bit-identical to ``before``.
    (The full head's matmul is not compared bit for bit: on some CPUs the BLAS kernel blocks a 49168-wide product
    differently from a 49152-wide one, which moves logits by ~4e-5; the weights and hidden states are unchanged.)"""
    h = model.hidden_states(probe)  # (1, T, dim)
    old_logits = torch.nn.functional.linear(h, model.output.weight[:old_n])
    return torch.equal(old_logits, before) and torch.allclose(model(probe)[..., :old_n], before, atol=1e-4, rtol=0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.checkpoint} ...", flush=True)
    try:
        model, tok = load_pretrained(args.checkpoint)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not hasattr(tok, "merge_ranks"):
        print(f"error: {args.checkpoint} has a {type(tok).__name__}; this demo extends byte-level BPE tokenizers "
              "(for SentencePiece use minllama.extend.vocab.extend_sentencepiece)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    train_texts, held_out = module_source(MODULES[:3] if args.quick else MODULES)

    start = time.perf_counter()
    print(f"learning {args.new_tokens} new tokens from {len(train_texts)} files "
          f"({sum(map(len, train_texts)) // 1000} KB of Python) ...", flush=True)
    new_tok, replaced = extend_bpe(tok, train_texts, args.new_tokens)
    old_n = tok.vocab_size
    print(f"added {len(replaced)} tokens in {time.perf_counter() - start:.0f} s, e.g. " +
          ", ".join(repr(new_tok.decode([old_n + j])) for j in range(min(8, len(replaced)))), flush=True)
    n_old_tokens = sum(len(tok.encode(t)) for t in held_out)
    n_new_tokens = sum(len(new_tok.encode(t)) for t in held_out)
    print(f"held-out Python code: {n_old_tokens} -> {n_new_tokens} tokens "
          f"({1 - n_new_tokens / n_old_tokens:.1%} shorter)")
    assert all(new_tok.decode(new_tok.encode(t)) == t for t in held_out), "the extended tokenizer must round-trip"

    probe = torch.tensor([tok.encode("def greet(name):\n    return f'Hello, {name}!'")])
    with torch.no_grad():
        before = model(probe)
    resize_vocab(model, replaced)
    same = old_part_unchanged(model, probe, before, old_n)
    print(f"old-token input, old logits bit-identical after resizing: {same}")

    ids = torch.tensor(new_tok.encode("\n".join(train_texts)))
    held = torch.tensor([new_tok.encode(held_out[0])[:args.seq_len + 1]])

    def held_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(held[:, :-1])[0], held[0, 1:]).item()

    loss_before = held_loss()
    handles = train_only_new_rows(model, old_n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    bar = tqdm(range(args.steps), desc="finetuning the new rows", unit="step")
    for step in bar:
        i = int(torch.randint(0, len(ids) - args.seq_len - 1, (1,), generator=g))
        batch = ids[i:i + args.seq_len + 1][None]
        loss = F.cross_entropy(model(batch[:, :-1])[0], batch[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    for h in handles:
        h.remove()
    loss_after = held_loss()
    still_same = old_part_unchanged(model, probe, before, old_n)
    print(f"held-out loss with the new tokens: {loss_before:.3f} -> {loss_after:.3f} after {args.steps} steps on "
          f"the new rows; old-token logits still bit-identical: {still_same}")

    print(f"saving to {out / 'extended'} and loading it back ...", flush=True)
    save_hf(model, out / "extended", tokenizer=new_tok)
    loaded, loaded_tok = load_pretrained(out / "extended")
    with torch.no_grad():
        reloaded = torch.equal(loaded(held[:, :-1]), model(held[:, :-1]))
    print(f"saved to {out / 'extended'}; reloaded model and tokenizer agree: "
          f"{reloaded and loaded_tok.encode(held_out[0]) == new_tok.encode(held_out[0])}")
    results = {"new_tokens": len(replaced), "held_out_tokens_before": n_old_tokens,
               "held_out_tokens_after": n_new_tokens, "old_logits_bit_identical": same and still_same,
               "held_out_loss_before": loss_before, "held_out_loss_after": loss_after, "reloaded": reloaded}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if same and still_same and reloaded else 1


if __name__ == "__main__":
    sys.exit(main())
