"""Chat with a Llama checkpoint in the terminal.

    uv run apps/chat.py                                   # SmolLM2-135M-Instruct, embedded, on the CPU
    uv run apps/chat.py --prompt "What is the capital of France?" --temperature 0
    uv run apps/chat.py --checkpoint path/to/hf-or-meta-dir-or.gguf
    uv run apps/chat.py --quantize int8 --compile         # 8-bit weights + a compiled decode step: ~3x the tokens/s

In the interactive chat, /reset forgets the conversation and /quit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import torch

from minllama.core.chat_format import chat_format_for
from minllama.core.checkpoint import load_pretrained
from minllama.core.session import ChatSession
from minllama.extend.streaming import StreamingChat

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --quantize choice -> (minllama.quant scheme, options). int4: groups of 32 (the grid of SmolLM2's Q4_1 file) and
# the output head at 8 bits, as llama.cpp does: +0.04% perplexity instead of +7.8% (minllama-quant README, 10)
QUANT = {"int8": ("int8", {}), "int4": ("int4", {"group_size": 32, "head": "int8"}), "nf4": ("nf4", {}),
         "fp8": ("fp8", {}), "q8_0": ("q8_0", {}), "q4_0": ("q4_0", {}), "q4_1": ("q4_1", {})}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, like every other error of this app (argparse adds the usage)
        self.exit(2, f"error: {message} (see --help)\n")


def checked(convert, ok, what):
    """An argparse type: ``convert`` the text (a ValueError is argparse's "invalid float value"), then refuse a value
    that is not ``ok`` with "must be <what>". Bad values fail here, before the model loads."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = convert.__name__
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="Chat with a Llama model (MinimalLlama).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct",
                   help="a known name, a .gguf file, an HF directory (config.json + safetensors) "
                        "or a Meta directory (params.json + consolidated.*.pth)")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive chat)")
    p.add_argument("--system", help="system prompt (default: the model family's own)")
    p.add_argument("--temperature", type=checked(float, lambda t: math.isfinite(t) and t >= 0,
                                               "a finite number >= 0"),
                   default=0.2, help="0 = greedy decoding")
    p.add_argument("--top-k", type=checked(int, lambda k: k >= 0, "an integer >= 0"), default=None,
                   help="sample only among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=checked(float, lambda q: 0 < q <= 1, "a number in (0, 1]"), default=0.9,
                   help="sample only among the tokens that make up p of the mass")
    p.add_argument("--max-new-tokens", type=checked(int, lambda n: n >= 1, "an integer >= 1"), default=512,
                   help="answer length limit, in tokens")
    p.add_argument("--seed", type=checked(int, lambda n: 0 <= n < 2**64, "an integer in [0, 2**64)"), default=None,
                   help="random seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight dtype (auto: bfloat16 on cuda, float32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, faster decode)")
    p.add_argument("--quantize", choices=list(QUANT),
                   help="quantize the weights after loading (minllama-quant): fewer bytes per token, so faster "
                        "decoding where memory is the limit (int8 and int4 cost < 0.2%% perplexity on SmolLM2; "
                        "nf4 and fp8 save memory, not time, on a CPU)")
    p.add_argument("--streaming", action="store_true",
                   help="attention sinks + a rolling KV cache (StreamingLLM): the chat goes on past the context "
                        "window in bounded memory, and each turn feeds only its new tokens")
    return p.parse_args(argv)


def device_problem(name: str) -> str | None:
    """Why tensors cannot live on device ``name``, or None; checked before loading rather than failing inside it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps"
    if device.type == "meta":
        return "--device meta holds no weights: use auto, cpu, cuda, cuda:N or mps"
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu ...
    if device.type != "cpu" and hasattr(backend, "device_count"):
        count = backend.device_count() if backend.is_available() else 0
        if (device.index or 0) >= count:
            found = f"only {count} {device.type} device(s)" if count else f"no {device.type} device"
            return f"--device {name}: this machine has {found}; use --device auto (or cpu)"
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 -- a backend this torch lacks fails in many ways (hpu: ImportError)
        return f"--device {name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    return None


def utf8_problem(option: str, text: str | None) -> str | None:
    """Python hands undecodable bytes of argv (and of stdin in a C locale) over as lone surrogates, which the
    tokenizer cannot encode: say which option holds which byte, instead of a UnicodeEncodeError at the first token."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(e.object[e.start]) - 0xDC00 if "\udc80" <= e.object[e.start] <= "\udcff" else None
        where = f" (byte 0x{byte:02X} at character {e.start})" if byte is not None else ""
        return f"{option} is not valid UTF-8 text{where}: check the terminal's encoding"
    return None


def answer(model, tokenizer, fmt, messages, args, generator) -> str:
    """Stream one assistant answer to stdout, print its speed to stderr, and return its text."""
    prompt = fmt.encode_dialog(tokenizer, messages)
    token_times: list[float] = []
    start, pieces = time.perf_counter(), []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                    on_token=lambda _: token_times.append(time.perf_counter()))
    # One cache for the whole conversation, so each turn prefills only its new tokens: a static cache that grows,
    # or with --streaming a rolling one. Both run the model's own forward through core's decode loop.
    for piece in args.session.stream_text(tokenizer, prompt, args.max_new_tokens, compile=args.compile, **sampling):
        print(piece, end="", flush=True)
        pieces.append(piece)
    n = len(token_times)
    if n:  # the first token comes out of the prefill; the rest are decode steps
        first = 1 if args.compile and n > 2 else 0  # the first compiled decode step may include compiling
        decode = (n - 1 - first) / (token_times[-1] - token_times[first]) if n > 1 else float("nan")
        print(f"\n[{n} tokens, {decode:.1f} tok/s decode; prompt {len(prompt)} tokens, {args.session.last_prefill} "
              f"of them new, prefilled in {token_times[0] - start:.2f} s]", file=sys.stderr)
    return "".join(pieces)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = ((device_problem(args.device) if args.device != "auto" else None)
               or utf8_problem("--prompt", args.prompt) or utf8_problem("--system", args.system))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        model, tokenizer = load_pretrained(args.checkpoint, dtype=dtype, device=device)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: {args.checkpoint} has no tokenizer file (tokenizer.json or tokenizer.model); add one",
              file=sys.stderr)
        return 2
    if args.quantize:
        from minllama.quant import prepare, quantize  # only needed (and installed) for --quantize

        scheme, options = QUANT[args.quantize]
        quantize(model, scheme, **options)
        prepare(model)  # the packed kernels' layouts, built now rather than at the first token
    if args.compile:  # a CUDA build of torch on a machine without CUDA warns about it when it first compiles
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    fmt = chat_format_for(tokenizer)
    args.session = (StreamingChat(model, n_sink=4, window=min(2044, model.config.max_seq_len - 4))
                    if args.streaming else ChatSession(model))
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    system = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        try:
            answer(model, tokenizer, fmt, system + [{"role": "user", "content": args.prompt}], args, generator)
        except ValueError as e:  # the prompt does not fit the context window
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    weights = f"{args.quantize} weights" if args.quantize else dtype
    print(f"Chatting with {args.checkpoint} on {device} ({weights}). /reset to start over, /quit to leave.")
    messages = list(system)
    while True:
        try:
            text = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeDecodeError:  # stdin decodes strictly in a UTF-8 locale (in a C locale: surrogates, below)
            print("error: the message is not valid UTF-8 text: check the terminal's encoding", file=sys.stderr)
            continue
        if problem := utf8_problem("the message", text):
            print(f"error: {problem}", file=sys.stderr)
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            messages = list(system)
            args.session.reset()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = answer(model, tokenizer, fmt, messages, args, generator)
        except ValueError as e:  # the conversation outgrew the context window
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
