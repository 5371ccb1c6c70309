"""A number-aware Llama (xVal) as a MinimalLlama subclass, compared with the same Llama reading digits.

    uv run apps/numeric_llama.py                            # a few minutes on a CPU; writes out/numeric_llama/
    uv run apps/numeric_llama.py --steps 5 --out /tmp/num   # a smoke run in seconds

The idea (Golkar et al. 2023, "xVal: A Continuous Number Encoding for Large Language Models", arXiv:2310.02989):
a tokenizer cuts "123.4" into digits (or arbitrary chunks), so the model must learn arithmetic on symbols. xVal
replaces every number by one token ``[NUM]`` and carries the value in the embedding itself:

    embedding at a [NUM] position = (value / scale) · E[NUM]        (other tokens: E[token], as usual)

and a second head (an MLP, next to the usual vocabulary head) predicts the *value* wherever the next token is
``[NUM]``. The loss is the usual next-token cross-entropy plus the squared error of those values. Reading a number
back is one regression instead of a chain of digit choices, and nearby numbers get nearby embeddings by design.

One change for Llama: every block reads its input through RMSNorm, which divides ``v · E[NUM]`` by its own size
and so erases ``v`` (xVal's GPT-2 escaped this because a position embedding is *added* before the norm). We add a
learned vector ``num_anchor`` at [NUM] positions, ``v · E[NUM] + num_anchor``: the norm then sees a direction that
turns with ``v``, and the value survives.

The experiment: generated questions ("12.3 + 45.6 = ", "double of 7.5 is ", "half of 80.2 is ",
"3.1, 5.6, 8.1, next "), operands in [0, 100) for training; held-out questions in that range and outside it
(operands in [100, 200)). The baseline is the very same MinimalLlama config and tokenizer, reading numbers
digit by digit and answering by greedy generation; both see the same lines for the same number of steps.
Outputs in ``--out``: ``numeric_comparison.png``, ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minllama.core.cache import KVCache, StaticKVCache
from minllama.core.checkpoint import atomic_write
from minllama.core.config import LlamaConfig
from minllama.core.generate import generate
from minllama.core.model import MinimalLlama

from lr_schedule import lr_at  # apps/lr_schedule.py, beside this script


# --------------------------------------------------------------------------------------------- the tokenizer
class NumberTokenizer:
    """Characters as tokens, in two modes over one vocabulary:

    - ``encode_digits("12.5 + 3 = ")``: every character is a token (the ordinary, digit-level baseline);
    - ``encode_numbers("12.5 + 3 = ")``: every number becomes ``[NUM]`` with its value / ``scale`` beside it;
      other tokens carry the value 1.0 (their embedding is used as is).
    """

    SPECIALS = ["<pad>", "<bos>", "\n", "[NUM]"]
    CHARS = " +-=.,0123456789abcdefghijklmnopqrstuvwxyz"
    NUMBER = re.compile(r"\d+(?:\.\d+)?")

    def __init__(self, scale: float = 100.0, decimals: int = 2):
        self.scale, self.decimals = scale, decimals
        self.vocab = self.SPECIALS + list(self.CHARS)
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.num_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _char_ids(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary; use only {self.CHARS!r} "
                             "and newlines") from None

    def encode_digits(self, text: str) -> list[int]:
        return self._char_ids(text)

    def decode_digits(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id))

    def encode_numbers(self, text: str) -> tuple[list[int], list[float]]:
        ids, values, end = [], [], 0
        for m in self.NUMBER.finditer(text):
            piece = self._char_ids(text[end:m.start()])
            ids += piece + [self.num_id]
            values += [1.0] * len(piece) + [float(m.group()) / self.scale]
            end = m.end()
        piece = self._char_ids(text[end:])
        return ids + piece, values + [1.0] * len(piece)

    def format_number(self, x: float) -> str:
        """12.50 -> "12.5", 3.0 -> "3": at most ``decimals`` digits after the point, no trailing zeros."""
        s = f"{x:.{self.decimals}f}".rstrip("0").rstrip(".")
        return "0" if s in ("", "-0") else s

    def decode_numbers(self, ids: list[int], values: list[float]) -> str:
        return "".join(self.format_number(v * self.scale) if i == self.num_id else self.vocab[i]
                       for i, v in zip(ids, values) if i not in (self.pad_id, self.bos_id))


# ------------------------------------------------------------------------------------------------- the model
class NumericLlama(MinimalLlama):
    """MinimalLlama with xVal's number embedding and number head; blocks, cache and vocabulary head unchanged.

    ``forward_numbers(tokens, values, input_pos, pad)`` -> (logits (B, T, vocab), numbers (B, T)): ``numbers[t]``
    is the predicted value of token t+1 if that token is [NUM]. ``forward(tokens, ...)`` is MinimalLlama's own
    (logits only, through ``hidden_states`` without values), so ``generate`` still works on text without numbers.
    """

    def __init__(self, cfg: LlamaConfig, num_id: int):
        super().__init__(cfg)
        self.num_id = num_id
        self.num_anchor = nn.Parameter(torch.zeros(cfg.dim))  # keeps the value visible through RMSNorm
        self.number_head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, 1))

    def embed(self, tokens: Tensor, values: Tensor | None) -> Tensor:
        """(B, T) tokens and values -> (B, T, dim): [NUM] embeddings scaled by their value."""
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        is_num = tokens == self.num_id
        if values is None:
            if bool(is_num.any()):
                raise ValueError("the tokens contain [NUM] but no values were given: call "
                                 "forward_numbers(tokens, values) or generate_numbers(...)")
            return h
        scaled = h * values.unsqueeze(-1).to(h.dtype) + self.num_anchor
        return torch.where(is_num.unsqueeze(-1), scaled, h)

    def hidden_states(self, tokens: Tensor, input_pos: Tensor | None = None, pad: Tensor | None = None,
                      values: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """MinimalLlama.hidden_states fed with ``embed``'s vectors: [NUM] embeddings scaled by their values.
        MinimalLlama.forward calls this without values, so text without numbers works as usual."""
        return super().hidden_states(tokens, input_pos, pad, embeddings=self.embed(tokens, values), cache=cache)

    def forward_numbers(self, tokens: Tensor, values: Tensor, input_pos: Tensor | None = None,
                        pad: Tensor | None = None, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        h = self.hidden_states(tokens, input_pos, pad, values, cache)
        return self.output(h), self.number_head(h).squeeze(-1)  # (B, T, vocab), (B, T)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)  # every Linear and Embedding ~ N(0, std²), norms to 1
        nn.init.normal_(self.num_anchor, mean=0.0, std=std)
        for m in self.number_head:
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


@torch.no_grad()
def generate_numbers(model: NumericLlama, prompts: list[tuple[list[int], list[float]]], max_new_tokens: int,
                     stop_id: int) -> list[tuple[list[int], list[float]]]:
    """Greedy decoding with the KV cache that also decodes values: when the model emits [NUM], the number head's
    prediction becomes that token's value and is fed back with it. Prompts must have equal lengths (a [NUM]
    is one token, so questions of one template do)."""
    if len({len(ids) for ids, _ in prompts}) != 1:
        raise ValueError("generate_numbers batches prompts of one length only: group the prompts by length")
    device = model.rope.device
    tokens = torch.tensor([ids for ids, _ in prompts], device=device)
    values = torch.tensor([vals for _, vals in prompts], device=device)
    B, T = tokens.shape
    cache = StaticKVCache(model, B, min(T + max_new_tokens, model.config.max_seq_len))
    logits, numbers = model.forward_numbers(tokens, values, cache.reserve(T, device), cache=cache)
    out = [([], []) for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(cache.room(max_new_tokens)):
        token = logits[:, -1].argmax(-1)  # (B,)
        value = torch.where(token == model.num_id, numbers[:, -1], torch.ones_like(numbers[:, -1]))
        for row in (~done).nonzero().flatten().tolist():
            out[row][0].append(int(token[row]))
            out[row][1].append(float(value[row]))
        done |= token == stop_id
        if bool(done.all()):
            break
        logits, numbers = model.forward_numbers(token[:, None], value[:, None], cache.reserve(1, device), cache=cache)
    return out


# -------------------------------------------------------------------------------------------------- the data
TASKS = ("add", "double", "half", "next")


def make_question(task: str, rng: random.Random, lo: float, hi: float) -> tuple[str, float]:
    """A question text ending where the answer starts, and the answer. Operands have one decimal."""
    a, b = round(rng.uniform(lo, hi), 1), round(rng.uniform(lo, hi), 1)
    f = NumberTokenizer().format_number
    if task == "add":
        return f"{f(a)} + {f(b)} = ", round(a + b, 2)
    if task == "double":
        return f"double of {f(a)} is ", round(2 * a, 2)
    if task == "half":
        return f"half of {f(a)} is ", round(a / 2, 2)
    d = round(rng.uniform(1, 10), 1)  # "next": an arithmetic sequence of step d
    return f"{f(a)}, {f(a + d)}, {f(a + 2 * d)}, next ", round(a + 3 * d, 2)


def question_set(n_per_task: int, lo: float, hi: float, seed: int) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    return [(task, *make_question(task, rng, lo, hi)) for task in TASKS for _ in range(n_per_task)]


def training_lines(n: int, rng: random.Random, lo: float, hi: float, held_out: set[str]) -> list[str]:
    """``n`` random question + answer lines, never one of the held-out questions."""
    lines = []
    while len(lines) < n:
        question, answer = make_question(rng.choice(TASKS), rng, lo, hi)
        if question not in held_out:
            lines.append(question + NumberTokenizer().format_number(answer))
    return lines


def batch_digits(tok: NumberTokenizer, lines: list[str]) -> Tensor:
    rows = [[tok.bos_id] + tok.encode_digits(line) + [tok.eos_id] for line in lines]
    width = max(map(len, rows))
    return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # (B, T), padded on the right


def batch_numbers(tok: NumberTokenizer, lines: list[str]) -> tuple[Tensor, Tensor]:
    rows = [tok.encode_numbers(line) for line in lines]
    rows = [([tok.bos_id] + ids + [tok.eos_id], [1.0] + vals + [1.0]) for ids, vals in rows]
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.tensor([ids + [tok.pad_id] * (width - len(ids)) for ids, _ in rows])
    values = torch.tensor([vals + [1.0] * (width - len(vals)) for _, vals in rows])
    return tokens, values


def digit_loss(model: MinimalLlama, tokens: Tensor, pad_id: int) -> Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=pad_id)


def numeric_loss(model: NumericLlama, tokens: Tensor, values: Tensor, pad_id: int,
                 mse_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """xVal's loss: next-token cross-entropy + mse_weight · squared error of the values of [NUM] targets."""
    logits, numbers = model.forward_numbers(tokens[:, :-1], values[:, :-1])
    targets, target_values = tokens[:, 1:], values[:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id)
    is_num = targets == model.num_id
    mse = F.mse_loss(numbers[is_num], target_values[is_num]) if bool(is_num.any()) else numbers.sum() * 0
    return ce + mse_weight * mse, ce, mse


# ------------------------------------------------------------------------------------------------ evaluation
def parse_number(text: str) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*", text)
    return float(m.group(1)) if m else None


@torch.no_grad()
def answer_digits(model: MinimalLlama, tok: NumberTokenizer, questions: list[str]) -> list[float | None]:
    """Greedy generation (KV cache, batched with left padding) until the newline; None if not a number."""
    model.eval()
    prompts = [[tok.bos_id] + tok.encode_digits(q) for q in questions]
    outs = generate(model, prompts, max_new_tokens=8, stop_ids=[tok.eos_id])
    return [parse_number(tok.decode_digits([i for i in out if i != tok.eos_id])) for out in outs]


@torch.no_grad()
def answer_numbers(model: NumericLlama, tok: NumberTokenizer, questions: list[str]) -> list[float | None]:
    """The value of the first [NUM] the model generates (None if it generates none before the newline)."""
    model.eval()
    answers: dict[int, float | None] = {}
    by_length: dict[int, list[int]] = {}
    encoded = [tok.encode_numbers(q) for q in questions]
    for i, (ids, _) in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for rows in by_length.values():
        prompts = [([tok.bos_id] + encoded[i][0], [1.0] + encoded[i][1]) for i in rows]
        for i, (ids, vals) in zip(rows, generate_numbers(model, prompts, max_new_tokens=3, stop_id=tok.eos_id)):
            answers[i] = next((v * tok.scale for t, v in zip(ids, vals) if t == tok.num_id), None)
    return [answers[i] for i in range(len(questions))]


def summarize(truth: list[float], predicted: list[float | None]) -> dict:
    pairs = [(t, p) for t, p in zip(truth, predicted) if p is not None]
    errors = sorted(abs(p - t) for t, p in pairs)
    relative = sorted(abs(p - t) / max(abs(t), 1e-9) for t, p in pairs)
    median = lambda xs: xs[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {"n": len(truth), "no_number": len(truth) - len(pairs),
            "mean_abs_error": sum(errors) / len(errors) if errors else float("nan"),
            "median_abs_error": median(errors), "median_rel_error": median(relative),
            "within_1_percent": sum(r <= 0.01 for r in relative) / len(truth)}


# -------------------------------------------------------------------------------------------- the experiment
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an xVal number-aware MinimalLlama and the same model on digits "
                                            "on generated arithmetic; compare on held-out and out-of-range "
                                            "questions.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/numeric_llama", help="folder for numeric_comparison.png and results.json")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps for each model")
    p.add_argument("--batch-size", type=int, default=32, help="lines per step (the same lines for both models)")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=3, help="transformer blocks")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup then cosine decay)")
    p.add_argument("--mse-weight", type=float, default=1.0, help="weight of the number loss in the xVal model")
    p.add_argument("--eval-per-task", type=int, default=50, help="held-out questions per task and range")
    p.add_argument("--train-max", type=float, default=100.0, help="training operands lie in [0, train-max); the "
                                                                 "out-of-range questions in [train-max, 2 train-max)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the questions")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads: a model this small gains nothing from "
                                                          "more, and extra threads wait for each other (measured "
                                                          "on 2 shared cores at load 4: a 20-step smoke run took 8 s with 1 thread, 23 s with 2)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_per_task < 1:
        p.error("--steps, --batch-size and --eval-per-task must be >= 1")
    if args.dim % 4 or args.train_max <= 0:
        p.error("--dim must be a multiple of 4 (4 heads) and --train-max positive")
    return args


def plot(evaluation: dict, train_max: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 5))
    colors = {"digits": "tab:blue", "xval": "tab:red"}
    for name in ("digits", "xval"):
        for split, marker in (("in_range", "o"), ("out_of_range", "x")):
            e = evaluation[name][split]
            pts = [(t, p) for t, p in zip(e["truth"], e["predicted"]) if p is not None]
            ax.scatter([t for t, _ in pts], [p for _, p in pts], s=10, marker=marker, color=colors[name],
                       alpha=0.5, label=f"{name}, {split.replace('_', ' ')}")
    top = 4 * train_max
    ax.plot([0, top], [0, top], "k--", lw=1, label="exact")
    ax.axvspan(0, 2 * train_max, color="gray", alpha=0.08, label="answers seen in training")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("true answer")
    ax.set_ylabel("model's answer")
    ax.set_title("held-out questions")
    ax.legend(fontsize=8)
    labels, width = ["in range", "out of range"], 0.38
    for k, name in enumerate(("digits", "xval")):
        medians = [evaluation[name][s]["summary"]["median_rel_error"] for s in ("in_range", "out_of_range")]
        xs = [i + (k - 0.5) * width for i in range(2)]
        bars.bar(xs, medians, width, color=colors[name], label=name)
        for x, m in zip(xs, medians):
            bars.text(x, m, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(2), labels)
    bars.set_ylabel("median relative error |pred - true| / true")
    bars.set_yscale("log")
    bars.set_title("lower is better")
    bars.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = NumberTokenizer(scale=args.train_max)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                      hidden_dim=3 * args.dim, max_seq_len=64, name="numeric-experiment")
    questions = {"in_range": question_set(args.eval_per_task, 0, args.train_max, args.seed + 1),
                 "out_of_range": question_set(args.eval_per_task, args.train_max, 2 * args.train_max, args.seed + 2)}
    held_out = {q for _, q, _ in questions["in_range"]}

    digits, xval = MinimalLlama(cfg), NumericLlama(cfg, tok.num_id)
    for model in (digits, xval):  # same seed right before the init: every shared weight starts identical
        torch.manual_seed(args.seed)
        model.init_weights()
    models = {"digits": digits, "xval": xval}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for n, m in models.items()}
    seconds = dict.fromkeys(models, 0.0)
    curves = {"digits_ce": [], "xval_ce": [], "xval_mse": []}
    rng = random.Random(args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.steps} steps of {args.batch_size} lines; {digits.num_params():,} parameters (digits), "
          f"{xval.num_params():,} (xVal: + number head and anchor); load average {load:.2f}")
    for step in range(args.steps):
        lines = training_lines(args.batch_size, rng, 0, args.train_max, held_out)  # the same lines for both
        for name, model in models.items():
            model.train()
            for group in opts[name].param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr)
            start = time.perf_counter()
            if name == "digits":
                loss = digit_loss(model, batch_digits(tok, lines), tok.pad_id)
                curves["digits_ce"].append(loss.item())
            else:
                loss, ce, mse = numeric_loss(model, *batch_numbers(tok, lines), tok.pad_id, args.mse_weight)
                curves["xval_ce"].append(ce.item())
                curves["xval_mse"].append(mse.item())
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            seconds[name] += time.perf_counter() - start
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}/{args.steps}: digits CE {curves['digits_ce'][-1]:.3f} | xVal CE "
                  f"{curves['xval_ce'][-1]:.3f} number MSE {curves['xval_mse'][-1]:.4f}", flush=True)

    evaluation = {}
    for name, answer in (("digits", answer_digits), ("xval", answer_numbers)):
        evaluation[name] = {}
        for split, qs in questions.items():
            truth = [a for _, _, a in qs]
            predicted = answer(models[name], tok, [q for _, q, _ in qs])
            tasks = [t for t, _, _ in qs]
            per_task = {task: summarize([a for a, t in zip(truth, tasks) if t == task],
                                        [p for p, t in zip(predicted, tasks) if t == task]) for task in TASKS}
            evaluation[name][split] = {"truth": truth, "predicted": predicted,
                                       "summary": summarize(truth, predicted), "per_task": per_task}
    report = format_report(evaluation, models, seconds)
    print(report)
    example = questions["out_of_range"][0]
    for name, answer in (("digits", answer_digits), ("xval", answer_numbers)):
        got = answer(models[name], tok, [example[1]])[0]
        print(f"{name:6s}: {example[1]}{'no number' if got is None else tok.format_number(got)}   "
              f"(true {tok.format_number(example[2])})")
    plot(evaluation, args.train_max, out / "numeric_comparison.png")
    results = {"args": vars(args), "config": cfg.to_dict(), "train_seconds": seconds, "curves": curves,
               "params": {n: m.num_params() for n, m in models.items()},
               "evaluation": {n: {s: {**e["summary"], "per_task": e["per_task"],
                                      "questions": [q for _, q, _ in questions[s]],
                                      "truth": e["truth"], "predicted": e["predicted"]}
                                  for s, e in ev.items()} for n, ev in evaluation.items()}}
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))
    print(f"wrote {out / 'numeric_comparison.png'} and {out / 'results.json'}")
    return results


def format_report(evaluation: dict, models: dict, seconds: dict) -> str:
    lines = [f"{'model':7s} {'split':13s} {'median |err|':>12s} {'mean |err|':>10s} {'median rel':>10s} "
             f"{'within 1%':>9s} {'no number':>9s}"]
    for name in ("digits", "xval"):
        for split in ("in_range", "out_of_range"):
            s = evaluation[name][split]["summary"]
            lines.append(f"{name:7s} {split:13s} {s['median_abs_error']:12.3f} {s['mean_abs_error']:10.3f} "
                         f"{s['median_rel_error']:10.4f} {s['within_1_percent']:9.1%} {s['no_number']:6d}/{s['n']}")
    lines.append("")
    lines.append(f"{'median relative error, per task':45s}" + "".join(f"{t:>9s}" for t in TASKS))
    for name in ("digits", "xval"):
        for split in ("in_range", "out_of_range"):
            per_task = evaluation[name][split]["per_task"]
            lines.append(f"{name + ' ' + split:45s}" + "".join(f"{per_task[t]['median_rel_error']:9.4f}"
                                                               for t in TASKS))
    lines.append("training time: " + ", ".join(f"{n} {seconds[n]:.1f} s ({models[n].num_params():,} params)"
                                               for n in models))
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
