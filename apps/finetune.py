"""LoRA-finetune SmolLM2-135M-Instruct on the CPU in a few minutes, and show that its behaviour changed.

The task: label a short review with exactly one lowercase word, ``positive`` or ``negative``. The base model knows
what sentiment is but answers in its own words ("Positive", "The sentiment is positive."...). A rank-8 LoRA on the
attention of the top layers teaches it the format. Held-out reviews (about subjects never seen in training) are
scored by exact match before and after.

    uv run apps/finetune.py                       # defaults: under a minute on a CPU (44 s on 2 busy cores)
    uv run apps/finetune.py --out runs/sentiment --steps 60
    uv run apps/finetune.py --out runs/sentiment --steps 90 --resume    # continue from the last checkpoint

Writes to --out: adapter/ (HF PEFT format: loads with minllama.peft.load_adapter or peft.PeftModel), loss.csv,
loss.png, samples.txt (answers before/after), results.json, and checkpoint.pt (for --resume).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minllama.core import CheckpointError, generate, load_pretrained
from minllama.core.checkpoint import load_plain
from minllama.core.chat_format import chat_format_for
from minllama.peft import (LoraConfig, adapter_parameters, adapter_state_dict, apply_lora, disabled_adapters,
                           save_adapter,
                           trainable_parameter_count)

SYSTEM = "Reply with one word: positive or negative."
SUBJECTS = ["the pizza", "the movie", "the hotel room", "the concert", "the new phone", "this book", "the service",
            "the coffee", "the hike", "the museum", "the video game", "the lecture", "the train ride", "the sofa",
            "the haircut", "the soup", "the play", "the laptop", "the beach", "the workshop", "the app", "the bakery",
            "the podcast", "the guided tour", "the headphones", "the garden", "the sequel", "the restaurant"]
HELD_OUT_SUBJECTS = ["the wedding", "the bicycle", "the opera", "the dentist visit", "the campsite", "the novel",
                     "the tea", "the ferry"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "amazing", "lovely", "fantastic", "superb", "charming",
            "brilliant"]
NEGATIVE = ["awful", "terrible", "boring", "disappointing", "horrible", "dreadful", "bad", "dull", "annoying",
            "mediocre"]
TEMPLATES = ["{s} was {a}.", "I found {s} {a}.", "Honestly, {s} felt {a}.", "Wow, {s} is {a}!",
             "My verdict: {s} was {a}.", "We all thought {s} was {a}."]


def make_dataset(subjects: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """(review, label) pairs, balanced between the two labels."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        adj = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = rng.choice(TEMPLATES).format(s=rng.choice(subjects), a=adj)
        out.append((text[0].upper() + text[1:], label))
    rng.shuffle(out)
    return out


def prompt_ids(tokenizer, fmt, review: str) -> list[int]:
    return fmt.encode_dialog(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": review}])


def encode_example(tokenizer, fmt, review: str, label: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end of turn, and the targets: -100 (no loss) everywhere but the answer."""
    prompt = prompt_ids(tokenizer, fmt, review)
    answer = tokenizer.encode(label, allow_special=False) + [tokenizer.special_tokens["<|im_end|>"]]
    ids = prompt + answer
    targets = [-100] * (len(prompt) - 1) + answer + [-100]  # position t predicts token t+1
    return ids, targets


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: the padding comes after every real token, so causal attention never
    lets a real token see it, and its targets are -100."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in examples])  # (B, T)
    targets = torch.tensor([t + [-100] * (T - len(t)) for _, t in examples])  # (B, T)
    return ids, targets


def answer_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens only. The vocabulary projection (49152 x 576) is the biggest matmul of
    SmolLM2: we run the model without its head and apply the head to the few positions that have a target."""
    hidden = model.hidden_states(ids)  # (B, T, dim): normalized final hidden states, no head yet
    keep = targets != -100  # (B, T)
    logits = model.output(hidden[keep])  # (n_answer_tokens, vocab)
    return F.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def evaluate(model, tokenizer, fmt, data, batch_size: int = 16, desc: str = "evaluate") -> tuple[float, list[str]]:
    """Exact-match accuracy (the answer is the label and nothing else) and the answers."""
    from tqdm import tqdm

    model.eval()
    answers = []
    with tqdm(total=len(data), desc=desc, unit="review", leave=False) as bar:
        for i in range(0, len(data), batch_size):
            chunk = data[i:i + batch_size]
            prompts = [prompt_ids(tokenizer, fmt, review) for review, _ in chunk]
            out = generate(model, prompts, max_new_tokens=8, stop_ids=tokenizer.stop_ids)
            answers += [tokenizer.decode([t for t in o if t not in tokenizer.stop_ids]).strip() for o in out]
            bar.update(len(chunk))
    correct = sum(a == label for a, (_, label) in zip(answers, data))
    return correct / max(len(data), 1), answers


def save_checkpoint(path: Path, model, opt, step: int, log: list[dict], args) -> None:
    """Adapter + optimizer + progress, written atomically (a crash mid-save keeps the previous checkpoint)."""
    state = {"step": step, "adapter": adapter_state_dict(model), "optimizer": opt.state_dict(), "log": log,
             "lora": {"r": args.rank, "alpha": args.alpha, "layers": args.layers, "targets": args.targets},
             "rng": torch.get_rng_state()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, args) -> dict:
    """The checkpoint to resume from, refused (before the model is even loaded) if its LoRA settings differ."""
    if not path.is_file():
        raise SystemExit(f"error: --resume: no checkpoint at {path}; run without --resume first")
    try:
        state = load_plain(path, "a finetune checkpoint")  # tensors, numbers and containers: never code
    except CheckpointError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    wanted = {"r": args.rank, "alpha": args.alpha, "layers": args.layers, "targets": args.targets}
    if state["lora"] != wanted:
        raise SystemExit(f"error: --resume: the checkpoint was trained with {state['lora']}, not {wanted}; "
                         "use the same --rank/--alpha/--layers/--targets")
    return state


def restore(state: dict, model, opt) -> tuple[int, list[dict]]:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in state["adapter"].items():  # layers.29.attention.wq.lora_A -> ...lora_A.default
            params[f"{key}.default"].copy_(value)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["log"]


def plot_loss(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the answer tokens")
    ax.set_yscale("log")
    ax.set_title("LoRA finetune of SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA-finetune SmolLM2-135M-Instruct to answer in a fixed format.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct", help="base model: a known name or a path")
    p.add_argument("--out", default="runs/finetune", help="output folder (adapter, logs, plot, checkpoint)")
    p.add_argument("--steps", type=int, default=30, help="total optimizer steps (with --resume: up to this step)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--targets", default="wq,wv", help="comma-separated layers to adapt (wq wk wv wo w1 w2 w3)")
    p.add_argument("--layers", type=int, default=10,
                   help="adapt the top N blocks only (0 = all): backward then stops at the lowest adapted block")
    p.add_argument("--train-examples", type=int, default=240, help="size of the generated training set")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out reviews scored before and after")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoint.pt every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: PyTorch's default, one per core). Measured on 2 cores shared at load "
                        "4, a smoke run (3 steps, 32 reviews scored twice) took 28 s with 1 thread and 79 s with 2: "
                        "more threads pay only on an idle machine")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    resume_state = read_checkpoint(ckpt, args) if args.resume else None
    print(f"loading {args.checkpoint} ...", flush=True)
    model, tokenizer = load_pretrained(args.checkpoint)
    fmt = chat_format_for(tokenizer)
    n_layers = model.config.n_layers
    top = n_layers if args.layers <= 0 else min(args.layers, n_layers)
    cfg = LoraConfig(r=args.rank, alpha=args.alpha, targets=tuple(args.targets.split(",")),
                     layers=tuple(range(n_layers - top, n_layers)))
    apply_lora(model, cfg)
    trainable, total = trainable_parameter_count(model)
    print(f"LoRA r={cfg.r} alpha={cfg.alpha} on {','.join(cfg.targets)} of the top {top} blocks: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    train = [encode_example(tokenizer, fmt, r, l) for r, l in make_dataset(SUBJECTS, args.train_examples, args.seed)]
    held_out = make_dataset(HELD_OUT_SUBJECTS, args.eval_examples, args.seed + 1)
    opt = torch.optim.AdamW(adapter_parameters(model), lr=args.lr, weight_decay=0.0)
    start, log = restore(resume_state, model, opt) if resume_state else (0, [])

    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if args.resume and results_file.is_file() else {}
    if "accuracy_before" not in results:
        with disabled_adapters(model):  # the base model (B = 0 at init anyway)
            results["accuracy_before"], results["answers_before"] = evaluate(model, tokenizer, fmt, held_out,
                                                                             desc="held-out, before")
        print(f"held-out exact-match accuracy before: {results['accuracy_before']:.0%}")
        results_file.write_text(json.dumps(results, indent=2) + "\n")  # a resumed run need not evaluate again

    order = random.Random(args.seed)
    batches = [i for _ in range((args.steps * args.batch_size) // len(train) + 1) for i in order.sample(
        range(len(train)), len(train))]  # epochs of shuffled indices; the same sequence on resume
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="finetune", unit="step")
    t0 = time.perf_counter()
    for step in bar:
        chunk = [train[i] for i in batches[step * args.batch_size:(step + 1) * args.batch_size]]
        ids, targets = collate(chunk, pad_id=tokenizer.special_tokens["<|im_end|>"])
        loss = answer_loss(model, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt, model, opt, step + 1, log, args)
    bar.close()
    train_s = time.perf_counter() - t0

    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss"])
        w.writeheader()
        w.writerows(log)
    if log:
        plot_loss(log, out / "loss.png")
    results["accuracy_after"], results["answers_after"] = evaluate(model, tokenizer, fmt, held_out,
                                                                   desc="held-out, after")
    results.update(steps=args.steps, train_seconds_this_run=round(train_s, 1), trainable_params=trainable,
                   total_params=total, final_loss=log[-1]["loss"] if log else None)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "samples.txt", "w") as f:
        for (review, label), before, after in zip(held_out, results["answers_before"], results["answers_after"]):
            f.write(f"{review!r} (want {label}): before {before!r} -> after {after!r}\n")
    save_adapter(model, out / "adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")

    print("samples (held-out review: before -> after):")
    for (review, _), before, after in list(zip(held_out, results["answers_before"], results["answers_after"]))[:4]:
        print(f"  {review!r}: {before!r} -> {after!r}")
    print(f"held-out exact-match accuracy: before {results['accuracy_before']:.0%}, "
          f"after {results['accuracy_after']:.0%}")
    print(f"adapter saved to {out / 'adapter'} (HF PEFT format); loss curve {out / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
