"""Real text for the vocabulary tutorial and tests: a few kB of Korean and English dialogues shipped in ``data/``.

They come from chatterbot-corpus (BSD-3-Clause, notice in ``data/LICENSE-chatterbot-corpus.txt``); the Korean
dialogues are translations of the English ones, so the two measure a tokenizer on the same content.
``apps/extend_vocab.py --domain language`` reads the whole corpus from the installed package instead.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from importlib.resources import files

LANGUAGES = ("korean", "english")


def dialogues(language: str) -> list[str]:
    """The shipped dialogues of ``language``: one string per dialogue, one turn per line."""
    if language not in LANGUAGES:
        raise ValueError(f"no shipped text for {language!r}: choose one of {', '.join(LANGUAGES)} (the whole corpus "
                         "of ~20 languages is in the chatterbot-corpus package, see apps/extend_vocab.py)")
    text = files("minllama.extend").joinpath("data", f"{language}.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


def split_held_out(documents: Sequence[str], fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split by document (a fixed shuffle), then drop from the held-out documents every line that also occurs in
    training: dialogue corpora repeat greetings and stock answers, and a repeated line would be text the new tokens
    were learned from, which flatters the measurement. Returns (train, held_out); held-out documents left empty
    are dropped."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction} must be between 0 and 1 (the share of documents held out)")
    order = list(documents)
    random.Random(seed).shuffle(order)
    cut = len(order) - max(1, round(len(order) * fraction))
    train, held = order[:cut], order[cut:]
    seen = {line for doc in train for line in doc.splitlines()}
    held = ["\n".join(line for line in doc.splitlines() if line not in seen) for doc in held]
    return train, [doc for doc in held if doc]
