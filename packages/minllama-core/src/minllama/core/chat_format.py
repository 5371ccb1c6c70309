"""Chat formats: how a list of ``{"role", "content"}`` messages becomes the token ids a chat model was tuned on.

A format is a template of special tokens and plain text. We build it as a list of *segments* - a token id
(from the template) or a string (template text or message content) - and tokenize every run of text with
special-token parsing switched off. So a user typing "<|im_end|>" gets plain text, not an end of turn, while
the ids stay identical to rendering the whole template to one string and tokenizing it (the reference way).
"""
from __future__ import annotations

import re

from .tokenizer_base import Tokenizer

Segment = int | str
SMOLLM_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ChatFormat:
    """Base class: subclasses turn messages into segments."""

    def segments(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError

    def encode_dialog(self, tokenizer: Tokenizer, messages: list[dict],
                      add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the dialog; with ``add_generation_prompt`` it ends where the assistant's answer starts."""
        ids, text = [], []
        for seg in [*self.segments(tokenizer, messages, add_generation_prompt), None]:
            if isinstance(seg, str):
                text.append(seg)
                continue
            if text:  # text runs end at special tokens, exactly where the tokenizer would split anyway
                ids += tokenizer.encode("".join(text), allow_special=False)
                text = []
            if seg is not None:
                ids.append(seg)
        return ids


def _special(tokenizer: Tokenizer, name: str) -> int:
    if name not in tokenizer.special_tokens:
        raise ValueError(f"this chat format needs the special token {name}, which the tokenizer lacks")
    return tokenizer.special_tokens[name]


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 layout: ``<|begin_of_text|>`` once, then per message
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>``; the generation prompt is an
    empty assistant header."""

    def segments(self, tokenizer, messages, add_generation_prompt):
        start, end, eot = (_special(tokenizer, t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
        out: list[Segment] = [_special(tokenizer, "<|begin_of_text|>")]
        for m in messages:
            out += [start, m["role"], end, "\n\n", m["content"].strip(), eot]
        return out + [start, "assistant", end, "\n\n"] * add_generation_prompt


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 chat layout (``llama/generation.py``): the system prompt is folded into the first user
    message as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n``; each (user, assistant) exchange is one SentencePiece text
    ``[INST] {user} [/INST] {answer} `` between BOS and EOS, and the last user message is ``[INST] ... [/INST]``
    after a BOS, without EOS. The user turn itself ends with the generation prompt, so ``add_generation_prompt``
    changes nothing; a dialog ending with an assistant message is encoded without a trailing prompt."""

    def segments(self, tokenizer, messages, add_generation_prompt):
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("Llama 2 chat: a system message must be followed by a user message")
            first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
            messages = [{"role": messages[1]["role"], "content": first}, *messages[2:]]
        expected = ["user", "assistant"] * (len(messages) // 2) + ["user"] * (len(messages) % 2)
        if [m["role"] for m in messages] != expected:
            raise ValueError("Llama 2 chat: roles must be (system), user, assistant, user, ... alternating")
        out: list[Segment] = []
        for user, answer in zip(messages[::2], messages[1::2]):
            out += [tokenizer.bos_id, f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ",
                    tokenizer.eos_id]
        if len(messages) % 2:
            out += [tokenizer.bos_id, f"[INST] {messages[-1]['content'].strip()} [/INST]"]
        return out


class ChatMLFormat(ChatFormat):
    """ChatML (SmolLM2, Qwen...): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, content as is.
    SmolLM2's template inserts a default system message when the dialog has none."""

    def __init__(self, default_system: str | None = SMOLLM_SYSTEM_PROMPT):
        self.default_system = default_system

    def segments(self, tokenizer, messages, add_generation_prompt):
        start, end = _special(tokenizer, "<|im_start|>"), _special(tokenizer, "<|im_end|>")
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        out: list[Segment] = []
        for m in messages:
            out += [start, f"{m['role']}\n{m['content']}", end, "\n"]
        return out + [start, "assistant\n"] * add_generation_prompt


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format of the tokenizer's family. For ChatML the default system prompt is read from the
    checkpoint's chat template (none if the template has none; SmolLM2's if there is no template)."""
    if tokenizer.family == "llama3":
        return Llama3ChatFormat()
    if tokenizer.family == "llama2":
        return Llama2ChatFormat()
    if tokenizer.chat_template is None:
        return ChatMLFormat()
    found = re.search(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", tokenizer.chat_template)
    return ChatMLFormat(found.group(1) if found else None)
