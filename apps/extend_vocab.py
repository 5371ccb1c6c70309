"""Extend the embedded SmolLM2's vocabulary for a new language (or for Python code), on a CPU in minutes.

    uv run apps/extend_vocab.py                        # Korean, 1024 new tokens, both finetunes: 324 s on 2 busy cores
    uv run apps/extend_vocab.py --language japanese    # any language of chatterbot-corpus
    uv run apps/extend_vocab.py --domain code          # Python source of the standard library instead: 234 s
    uv run apps/extend_vocab.py --quick --out /tmp/v   # a smoke run: under a minute

Steps (see packages/minllama-extend/README.md, section 5):
1. the text: every dialogue of the language in the chatterbot-corpus package (real, user-contributed, BSD-3-Clause),
   split by dialogue with a fixed seed, 20% held out (lines that also occur in training dropped from it); the
   English dialogues are split the same way, to check that English does not get more expensive;
2. SmolLM2's byte-level BPE continues training on the new text (``extend_bpe``: new merges ranked after the old);
   for comparison a Llama-2-style SentencePiece model, trained here on the English dialogues, gets the language's
   pieces appended (``extend_sentencepiece``); tokens per character held out, before and after, for both;
3. the model: the embedding (tied head) grows by one row per new token, each the mean of the old pieces it
   replaces (``resize_vocab``); old-token inputs must give bit-identical old logits;
4. held-out bits per character (comparable across tokenizers, unlike loss per token): the base model with the
   old tokenizer, the grown model with the new one, after training only the new rows (``train_only_new_rows``),
   then after a short LoRA finetune (minllama-peft) with the new rows still learning; and, as a control, the same
   LoRA finetune of the base model with the old tokenizer (what the finetune alone buys, without new tokens).
Outputs in ``--out``: ``extended/`` (HF checkpoint after the new-row training), ``adapter/`` (the LoRA),
``results.json``, ``extend_vocab.png`` (or ``--plot``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minllama.core.checkpoint import load_pretrained, save_hf
from minllama.core.tokenizer import SentencePieceTokenizer
from minllama.extend.sample_text import split_held_out
from minllama.extend.vocab import (extend_bpe, extend_sentencepiece, resize_vocab, tokens_per_char,
                                   train_only_new_rows, train_sentencepiece)

MODULES = ["argparse", "subprocess", "tarfile", "zipfile", "pathlib", "inspect", "threading", "logging",
           "functools", "typing", "dataclasses", "shutil", "tempfile", "configparser", "csv", "pickle"]
CANDIDATES = ["russian", "ukrainian", "persian", "hindi", "chinese", "japanese", "korean"]  # non-Latin scripts
LLAMA2_STYLE = dict(byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                    split_digits=True)  # as Llama 2's tokenizer.model was trained: BPE on raw text, bytes for the rest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="model name, GGUF file or checkpoint dir")
    p.add_argument("--domain", choices=["language", "code"], default="language",
                   help="a new language (chatterbot-corpus dialogues) or Python source code")
    p.add_argument("--language", default="korean", help="a chatterbot-corpus language (--domain language)")
    p.add_argument("--new-tokens", type=int, default=1024, help="how many tokens to add")
    p.add_argument("--sp-vocab", type=int, default=2000, help="SentencePiece: size of the language's own model")
    p.add_argument("--steps", type=int, default=24, help="finetuning steps on the new rows only")
    p.add_argument("--lora-steps", type=int, default=24, help="then LoRA steps (new rows still learning); 0: none")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per finetuning step")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the new rows")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--eval-pieces", type=int, default=48, help="held-out pieces (of <= 400 characters) scored")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: PyTorch's default, one per core). Measured on 2 cores shared at load "
                        "4: a finetuning step took 3.3 s with 1 thread, 9 s with 2")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 tokens, 2 + 2 steps, little text")
    p.add_argument("--out", default="out/extend_vocab", help="output directory")
    p.add_argument("--plot", default=None, help="where to write the figure (default: OUT/extend_vocab.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.sp_vocab, args.steps, args.lora_steps = 16, 1000, 2, 2
        args.seq_len, args.eval_pieces = 64, 6
    return args


# ------------------------------------------------------------------------------------------------- the text
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


def corpus_dialogues(language: str) -> list[str]:
    """Every dialogue of ``language`` in chatterbot-corpus (YAML files, one per topic): one string per dialogue,
    one turn per line, runs of whitespace collapsed."""
    import chatterbot_corpus
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not folder.is_dir():
        known = sorted(p.name for p in folder.parent.iterdir() if p.is_dir())
        raise ValueError(f"chatterbot-corpus has no language {language!r}; it has: {', '.join(known)}")
    out = []
    for file in sorted(folder.glob("*.yml")):
        for dialogue in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations") or []:
            out.append("\n".join(" ".join(str(turn).split()) for turn in dialogue))
    return list(dict.fromkeys(out))  # repeated dialogues once


def eval_pieces(texts: list[str], limit: int, max_chars: int = 400) -> list[str]:
    """Up to ``limit`` pieces of at most ~``max_chars`` characters, cut at line ends: every tokenizer scores the
    same pieces, each one sequence (a short dialogue is one piece; a source file becomes many)."""
    pieces = []
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len(piece) + len(line) > max_chars:
                pieces.append(piece)
                piece = ""
            piece += line
        pieces.append(piece)
    return [p for p in pieces if p.strip()][:limit]


# ------------------------------------------------------------------------------------------------- the model
@torch.no_grad()
def bits_per_char(model, tokenizer, pieces: list[str], batch: int = 8) -> float:
    """Held-out cross-entropy in bits per character: every token of each piece is predicted (after a leading
    <|endoftext|>), the total is divided by the characters. Per token would favour the tokenizer with more, easier
    tokens; per character compares tokenizations of the same text."""
    start = tokenizer.special_tokens.get("<|endoftext|>", 0)
    total = 0.0
    for i in range(0, len(pieces), batch):
        seqs = [[start] + tokenizer.encode(p) for p in pieces[i:i + batch]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # (B, T), right-padded
        targets = torch.tensor([s[1:] + [-100] * (width - len(s)) for s in seqs])  # pads: no loss
        logits = model(ids[:, :-1])  # (B, T-1, vocab)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100).item()
    return total / math.log(2) / sum(map(len, pieces))


@torch.no_grad()
def old_part_unchanged(model, probe, before, old_n: int) -> bool:
    """The old tokens' logits, computed by the old rows of the (now larger) head, are bit-identical to ``before``.
    (The full head's matmul is not compared bit for bit: on some CPUs the BLAS kernel blocks a 49168-wide product
    differently from a 49152-wide one, which moves logits by ~4e-5; the weights and hidden states are unchanged.)"""
    h = model.hidden_states(probe)  # (1, T, dim)
    old_logits = torch.nn.functional.linear(h, model.output.weight[:old_n])
    return torch.equal(old_logits, before) and torch.allclose(model(probe)[..., :old_n], before, atol=1e-4, rtol=0)


def finetune(model, ids: torch.Tensor, params, steps: int, seq_len: int, lr: float, desc: str) -> list[float]:
    """``steps`` AdamW steps (no weight decay: it would move frozen-by-hook rows) on random windows of ``ids``."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step")
    for _ in bar:
        i = int(torch.randint(0, max(1, len(ids) - seq_len - 1), (1,), generator=g))
        batch = ids[i:i + seq_len + 1][None]  # (1, seq_len + 1)
        loss = F.cross_entropy(model(batch[:, :-1])[0], batch[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return losses


def lora_finetune(model, ids: torch.Tensor, steps: int, seq_len: int, lr: float, new_from: int | None = None,
                  desc: str = "LoRA finetune") -> list[float]:
    """A rank-8 LoRA (minllama-peft) on every linear layer of every block. With ``new_from``, the embedding rows
    from that id on keep learning too (tied head: the same rows), the old rows stay as they are: the recipe of
    Chinese-LLaMA (LoRA plus the new embeddings), in miniature."""
    from minllama.peft import LoraConfig, adapter_parameters, apply_lora

    targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    apply_lora(model, LoraConfig(r=8, alpha=16, targets=targets))  # freezes everything else
    params = adapter_parameters(model)
    hook = None
    if new_from is not None:
        rows = model.tok_embeddings.weight
        rows.requires_grad_(True)
        hook = rows.register_hook(lambda g: torch.cat([torch.zeros_like(g[:new_from]), g[new_from:]]))
        params.append(rows)
    losses = finetune(model, ids, params, steps, seq_len, lr, desc)
    if hook is not None:
        hook.remove()
    return losses


# ------------------------------------------------------------------------------------------------- reporting
def sentencepiece_rows(english_train, new_train, held, english_held, vocab: int) -> list[dict]:
    """A Llama-2-style tokenizer.model trained on the English dialogues stands in for Llama 2's; the language's
    own SentencePiece model of ``vocab`` pieces is merged into it. Tokens per character, before -> after."""
    base = SentencePieceTokenizer(model_proto=train_sentencepiece(english_train, 4000, **LLAMA2_STYLE))
    ext, added = extend_sentencepiece(base, new_train, vocab, character_coverage=0.9995, **LLAMA2_STYLE)
    assert all(ext.decode(ext.encode(t)) == t for t in held + english_held), "the merged model must round-trip"
    return [dict(tokenizer=f"Llama-2-style SentencePiece ({base.vocab_size})", added=len(added), text=name,
                 before=tokens_per_char(base, texts), after=tokens_per_char(ext, texts))
            for name, texts in (("new", held), ("English", english_held))]


def print_table(res: dict) -> None:
    lang = res["text"]
    print(f"\n{'tokens per character, held out':<58}{'before':>8}{'after':>8}{'ratio':>8}")
    for r in res["tokenizers"]:
        name = f"{r['tokenizer']} +{r['added']}, {lang if r['text'] == 'new' else 'English'}"
        print(f"{name:<58}{r['before']:>8.3f}{r['after']:>8.3f}{r['before'] / r['after']:>7.2f}x")
    first = res["tokenizers"][0]
    print(f"sequence length of held-out {lang} with SmolLM2: x{first['after'] / first['before']:.2f}; attention "
          f"cost (quadratic) x{(first['after'] / first['before']) ** 2:.2f}")
    print(f"embedding rows added: {res['new_tokens']} (tied head: the same rows), each initialised to the mean of "
          "the embeddings of the old pieces it replaces")
    print(f"\n{'held-out bits per character (' + lang + ')':<58}{'bits/char':>10}")
    for stage, value in res["bits_per_char"].items():
        print(f"{stage:<58}{value:>10.3f}")
    if res.get("english_bits_per_char"):
        print("English held out, bits/char: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                          res["english_bits_per_char"].items()))


def plot(res: dict, losses: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 5))
    rows = res["tokenizers"]
    short = {True: "SmolLM2 BPE", False: "Llama-2-style\nSentencePiece"}
    labels = [short[r["tokenizer"].startswith("SmolLM2")] + "\n" + (res["text"] if r["text"] == "new" else "English")
              for r in rows]
    x = torch.arange(len(rows)).numpy()
    a.bar(x - 0.2, [r["before"] for r in rows], 0.4, label="before")
    a.bar(x + 0.2, [r["after"] for r in rows], 0.4, label="after")
    a.set_xticks(x, labels, fontsize=8)
    a.set_ylabel("tokens per character (held out)")
    a.set_title("tokenizer cost")
    a.legend()
    stages = list(res["bits_per_char"])
    b.bar(range(len(stages)), list(res["bits_per_char"].values()),
          color=["C7" if s.startswith("control") else "C2" for s in stages])
    for i, v in enumerate(res["bits_per_char"].values()):
        b.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    b.set_xticks(range(len(stages)), [textwrap.fill(s, 13) for s in stages], fontsize=7)
    b.set_ylabel("bits per character (held out)")
    b.set_title(f"SmolLM2-135M on {res['text']}")
    for name, ys in losses.items():
        c.plot(ys, label=name)
    c.set_xlabel("step")
    c.set_ylabel("training loss (nats per token of its own tokenizer)")
    c.set_title("finetuning")
    c.set_ylim(0, 1.45 * max(max(ys) for ys in losses.values()))  # room for the legend above the curves
    c.legend(fontsize=8, loc="upper right")
    fig.suptitle(res["command"], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.domain == "language":
        try:
            dialogues = corpus_dialogues(args.language)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.quick:
            dialogues = dialogues[:120]
        train_texts, held_out = split_held_out(dialogues)
        if len(train_texts) < 20 or sum(map(len, held_out)) < 200:
            print(f"error: chatterbot-corpus has only {len(dialogues)} dialogues ({sum(map(len, dialogues))} "
                  f"characters) of {args.language}: too little to learn tokens from and hold some out; choose a "
                  f"language with more ({', '.join(CANDIDATES)})", file=sys.stderr)
            return 2
        english_train, english_held = split_held_out(corpus_dialogues("english"))
        name = args.language
    else:
        train_texts, held_out = module_source(MODULES[:3] if args.quick else MODULES)
        english_train = english_held = []
        name = "Python code"
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
    print(f"load average {os.getloadavg()[0]:.1f} (a shared machine: timings vary)")
    if args.domain == "language" and not args.quick:
        costs = {lang: tokens_per_char(tok, corpus_dialogues(lang)) for lang in CANDIDATES + ["english"]}
        print("SmolLM2 tokens per character on chatterbot-corpus: " +
              ", ".join(f"{k} {v:.2f}" for k, v in sorted(costs.items(), key=lambda kv: -kv[1])))

    start = time.perf_counter()
    print(f"learning {args.new_tokens} new tokens from {len(train_texts)} {name} texts "
          f"({sum(map(len, train_texts)) // 1000}k characters; {len(held_out)} held out, "
          f"{sum(map(len, held_out)) // 1000}k characters) ...", flush=True)
    new_tok, replaced = extend_bpe(tok, train_texts, args.new_tokens)
    old_n = tok.vocab_size
    print(f"added {len(replaced)} tokens in {time.perf_counter() - start:.0f} s, e.g. " +
          ", ".join(repr(new_tok.decoder[old_n + j].decode(errors="backslashreplace"))  # a part of a character:
                    for j in range(min(8, len(replaced)))), flush=True)  # its bytes
    n_old_tokens = sum(len(tok.encode(t)) for t in held_out)
    n_new_tokens = sum(len(new_tok.encode(t)) for t in held_out)
    print(f"held-out {name}: {n_old_tokens} -> {n_new_tokens} tokens ({1 - n_new_tokens / n_old_tokens:.1%} shorter)")
    assert all(new_tok.decode(new_tok.encode(t)) == t for t in held_out + english_held), "must round-trip"
    tokenizers = [dict(tokenizer=f"SmolLM2 byte-level BPE ({old_n})", added=len(replaced), text=text,
                       before=tokens_per_char(tok, texts), after=tokens_per_char(new_tok, texts))
                  for text, texts in (("new", held_out), ("English", english_held)) if texts]
    if args.domain == "language":
        print("a Llama-2-style SentencePiece model: training on English, merging the new language ...", flush=True)
        tokenizers += sentencepiece_rows(english_train, train_texts, held_out, english_held, args.sp_vocab)

    pieces, english_pieces = eval_pieces(held_out, args.eval_pieces), eval_pieces(english_held, args.eval_pieces)
    print(f"scoring {len(pieces)} held-out pieces with the base model ...", flush=True)
    bpc = {"base model, old tokenizer": bits_per_char(model, tok, pieces)}
    english_bpc = {"base": bits_per_char(model, tok, english_pieces)} if english_pieces else {}
    control_bpc, losses = None, {}
    if args.lora_steps:  # the control: the same LoRA finetune without new tokens, from the same base model
        control = copy.deepcopy(model)
        old_ids = torch.tensor([i for t in train_texts for i in [0] + tok.encode(t)])
        losses["control: LoRA r=8, old tokenizer"] = lora_finetune(control, old_ids, args.lora_steps, args.seq_len,
                                                                    args.lora_lr, desc="control LoRA (old tokens)")
        control_bpc = bits_per_char(control, tok, pieces)
        del control
    probe = torch.tensor([tok.encode("def greet(name):\n    return f'Hello, {name}!' " + held_out[0][:80])])
    with torch.no_grad():
        before = model(probe)
    resize_vocab(model, replaced)
    same = old_part_unchanged(model, probe, before, old_n)
    print(f"old-token input, old logits bit-identical after resizing: {same}")
    bpc["new tokens, mean-of-pieces init"] = bits_per_char(model, new_tok, pieces)

    ids = torch.tensor([i for t in train_texts for i in [0] + new_tok.encode(t)])  # documents after <|endoftext|>
    handles = train_only_new_rows(model, old_n)
    losses["new rows only"] = finetune(model, ids, [p for p in model.parameters() if p.requires_grad], args.steps,
                                       args.seq_len, args.lr, "finetuning the new rows")
    for h in handles:
        h.remove()
    bpc[f"+ {args.steps} steps on the new rows"] = bits_per_char(model, new_tok, pieces)
    still_same = old_part_unchanged(model, probe, before, old_n)
    if english_pieces:
        english_bpc["new rows trained"] = bits_per_char(model, new_tok, english_pieces)
    print(f"held-out bits/char: {' -> '.join(f'{v:.3f}' for v in bpc.values())}; old-token logits still "
          f"bit-identical: {still_same}")

    print(f"saving to {out / 'extended'} and loading it back ...", flush=True)
    save_hf(model, out / "extended", tokenizer=new_tok)
    loaded, loaded_tok = load_pretrained(out / "extended")
    check = torch.tensor([new_tok.encode(pieces[0])])
    with torch.no_grad():
        reloaded = torch.equal(loaded(check), model(check))
    reloaded = reloaded and loaded_tok.encode(held_out[0]) == new_tok.encode(held_out[0])
    print(f"reloaded model and tokenizer agree: {reloaded}")
    del loaded

    if args.lora_steps:
        from minllama.peft import save_adapter

        losses["LoRA r=8 + new rows"] = lora_finetune(model, ids, args.lora_steps, args.seq_len, args.lora_lr,
                                                      new_from=old_n)
        bpc[f"+ {args.lora_steps} steps of LoRA"] = bits_per_char(model, new_tok, pieces)
        if english_pieces:
            english_bpc["after LoRA"] = bits_per_char(model, new_tok, english_pieces)
        save_adapter(model, out / "adapter")
        bpc[f"control: {args.lora_steps} steps of LoRA, old tokenizer"] = control_bpc

    elapsed = time.perf_counter() - started
    command = "uv run apps/extend_vocab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": command.strip(), "domain": args.domain, "text": name, "new_tokens": len(replaced),
           "held_out_tokens_before": n_old_tokens, "held_out_tokens_after": n_new_tokens,
           "tokenizers": tokenizers, "bits_per_char": bpc, "english_bits_per_char": english_bpc,
           "old_logits_bit_identical": same and still_same, "reloaded": reloaded, "losses": losses,
           "seconds": round(elapsed), "load_average": round(os.getloadavg()[0], 1)}
    print_table(res)
    figure = Path(args.plot) if args.plot else out / "extend_vocab.png"
    plot(res, losses, figure)
    (out / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    print(f"\n{elapsed:.0f} s in all (load average {res['load_average']}); figure: {figure}; "
          f"results: {out / 'results.json'}")
    return 0 if same and still_same and reloaded else 1


if __name__ == "__main__":
    sys.exit(main())
