"""Chat with a Llama checkpoint in the terminal.

    uv run apps/chat.py                                   # SmolLM2-135M-Instruct, embedded, on the CPU
    uv run apps/chat.py --prompt "What is the capital of France?" --temperature 0
    uv run apps/chat.py --checkpoint path/to/hf-or-meta-dir-or.gguf
    uv run apps/chat.py --quantize int8 --compile         # 8-bit weights + a compiled decode step: ~3x the tokens/s
                                                          # (the first answer waits ~1 min for the compiler)

In the interactive chat, /reset forgets the conversation and /quit (or Ctrl-D) leaves. Ctrl-C during an answer
stops it and keeps what was said so far as the assistant's turn (the next message continues the conversation from
there); Ctrl-C at the prompt leaves.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time

# MKL (PyTorch's fp32 matrix products on x86) reads this once, as torch starts: it then frees its work buffers
# after each product instead of pooling them (~20 MB less after a long prompt; see minllama.core.memory).
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

import torch  # noqa: E402 (this import and those below come after the line above)

from minllama.core.chat_format import chat_format_for  # noqa: E402
from minllama.core.checkpoint import load_pretrained  # noqa: E402
from minllama.core.dtypes import DTYPE_HELP, DTYPES, resolve_dtype  # noqa: E402
from minllama.core.session import ChatSession  # noqa: E402
from minllama.extend.streaming import StreamingChat  # noqa: E402

# --quantize choice -> (minllama.quant scheme, options). int4: groups of 32 (the grid of SmolLM2's Q4_1 file) and
# the output head at 8 bits, as llama.cpp does: +0.04% perplexity instead of +7.8% (minllama-quant README, 10)
QUANT = {"int8": ("int8", {}), "int4": ("int4", {"group_size": 32, "head": "int8"}), "nf4": ("nf4", {}),
         "fp8": ("fp8", {}), "q8_0": ("q8_0", {}), "q4_0": ("q4_0", {}), "q4_1": ("q4_1", {})}
COMPILE_SECONDS = 60  # measured: SmolLM2-135M's first compiled decode step on 2 shared CPU cores (approximate)
CLEAR_LINE = "\r\x1b[K"  # back to the start of the terminal line and erase it


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, like every other error of this app (argparse adds the usage)
        self.exit(2, f"error: {message} (see --help)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where there is no value to show (no default,
    a flag) or the help already says what the default is."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def model_dtype(args, device: str) -> torch.dtype:
    """--dtype as a torch dtype. With --quantize on a CPU, "auto" is float32: the CPU's low-bit kernels take fp32
    activations (minllama-quant's README measures them so)."""
    if args.quantize and args.dtype == "auto" and device == "cpu":
        return torch.float32
    return resolve_dtype(args.dtype, device)


def kv_cache_dtype(args, cpu_decode: bool) -> torch.dtype | None:
    """--kv-cache as the model's ``kv_cache_dtype`` (None: the model's own dtype). "auto" narrows it only where it
    costs no time: the C++ step reads a bf16 cache directly, where core's attention would convert it every step."""
    if args.kv_cache != "auto":
        return DTYPES[args.kv_cache]
    return torch.bfloat16 if args.quantize and cpu_decode else None


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
    p = Parser(description="Chat with a Llama model (MinimalLlama). In the chat: /reset starts over, /quit or "
                           "Ctrl-D leaves; Ctrl-C stops an answer (what it said so far stays in the conversation), "
                           "and Ctrl-C at the prompt leaves.", formatter_class=Help)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct",
                   help="a known name, a .gguf file, an HF directory (config.json + safetensors) "
                        "or a Meta directory (params.json + consolidated.*.pth)")
    p.add_argument("--prompt", help="answer this one message and exit (no interactive chat)")
    p.add_argument("--system", help="system prompt (default: the model family's own)")
    p.add_argument("--temperature", type=checked(float, lambda t: math.isfinite(t) and t >= 0,
                                               "a finite number >= 0"),
                   default=0.2, help="0 = greedy decoding")
    p.add_argument("--top-k", type=checked(int, lambda k: k >= 0, "an integer >= 0"), default=None,
                   help="sample only among the k most likely tokens (0 or unset: no limit)")
    p.add_argument("--top-p", type=checked(float, lambda q: 0 < q <= 1, "a number in (0, 1]"), default=0.9,
                   help="sample only among the tokens that make up p of the mass")
    p.add_argument("--repetition-penalty", type=checked(float, lambda r: math.isfinite(r) and r > 0,
                                                        "a finite number > 0"), default=1.0,
                   help="make every token already in the conversation less likely (CTRL's penalty, as in "
                        "transformers: positive logits are divided by it, negative ones multiplied); 1 = off. On "
                        "SmolLM2-135M (seed 0), 1.1 ended an answer that looped at 1.0; 1.2 ended a looping poem but "
                        "turned longer answers into babble")
    p.add_argument("--max-new-tokens", type=checked(int, lambda n: n >= 1, "an integer >= 1"), default=320,
                   help="answer length limit, in tokens. SmolLM2-135M's answers that ended by themselves "
                        "took 179-279 tokens (4 prompts, seed 0); one that loops runs to the limit")
    p.add_argument("--seed", type=checked(int, lambda n: 0 <= n < 2**64, "an integer in [0, 2**64)"), default=None,
                   help="random seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=DTYPE_HELP)
    p.add_argument("--threads", type=checked(int, lambda n: n >= 1, "an integer >= 1"), default=None,
                   help=f"CPU threads (default: torch's, one per core: {torch.get_num_threads()} here). On a busy "
                        "machine fewer can be faster: SmolLM2-135M on 2 cores shared at load 4 decoded 2-25 tok/s "
                        "with 2 threads, a steady 15 with 1")
    p.add_argument("--compile", action="store_true",
                   help=f"torch.compile the decode step: faster decoding, but the first answer waits while it "
                        f"compiles (roughly {COMPILE_SECONDS} s measured on 2 busy CPU cores), and a chat again "
                        "each time its cache outgrows a power of two (512, 1024 ... tokens; with --streaming only "
                        "once)")
    p.add_argument("--quantize", choices=list(QUANT),
                   help="quantize the weights as they load, layer by layer (minllama-quant): fewer bytes per "
                        "token, so faster decoding where memory is the limit (int8 and int4 cost < 0.2%% perplexity "
                        "on SmolLM2; nf4 and fp8 save memory, not time, on a CPU)")
    p.add_argument("--no-cpu-decode", action="store_true",
                   help="decode through core's PyTorch layers only. By default, on a CPU with AVX-512, each "
                        "one-token step of an fp32 or bf16 model (also with --quantize int8, int4, q8_0, q4_0, "
                        "q4_1) runs its decoder layers in C++ (minllama.kernels.cpu_decode: fp32 arithmetic; 4-bit "
                        "weights meet x rounded to int8 per block of 32, as in llama.cpp; 1.5-4.5x the tokens/s "
                        "measured; built once on first use, ~20-40 s). Not with --compile")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the dtype the KV cache stores keys and values in. auto: bfloat16 for a --quantize model "
                        "whose steps run in C++ (half the cache's memory, the C++ step reads it as fast; llama.cpp "
                        "keeps F16 keys and values by default), otherwise the model's dtype")
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


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), defined as transformers' RepetitionPenaltyLogitsProcessor:
    the logit of every token already in the context (``seen``, a boolean mask over the vocabulary) is divided by
    ``penalty`` where it is positive and multiplied by it where it is negative, so a penalty > 1 always makes a
    seen token less likely, whatever the sign of its logit."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


class RepetitionPenalty:
    """Applies ``penalize_repetition`` to every logit the model returns, through a forward hook: core's decode loop
    (compiled or not, any cache) samples from penalized logits without knowing about it. The context is ``seen``:
    ``start`` sets it to the whole prompt before an answer, and every forward adds the tokens it is fed (the
    answer's tokens, one per decode step). Every position of a forward is penalized by the whole context; only the
    last one is sampled from."""

    def __init__(self, model: torch.nn.Module, penalty: float):
        self.penalty = penalty
        self.seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=model.rope.device)
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def start(self, context: list[int]) -> None:
        self.seen.zero_()  # in place: a compiled decode step keeps reading the same tensor
        self.seen[torch.tensor(context, dtype=torch.long, device=self.seen.device)] = True

    def _hook(self, module, args, kwargs, logits):
        tokens = args[0] if args else kwargs["tokens"]
        self.seen[tokens.reshape(-1)] = True
        return penalize_repetition(logits, self.seen, self.penalty)


class CtrlC:
    """While active, the first Ctrl-C (SIGINT) only raises a flag, which the answer loop reads between tokens: the
    generation stops at a clean point (the KV cache and a --streaming session stay consistent) instead of dying in
    a KeyboardInterrupt wherever it was. A second Ctrl-C before the answer stops (a slow first compile, a long
    prompt) is an ordinary KeyboardInterrupt. The previous handler comes back on exit."""

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class NoCtrlC:  # --prompt: Ctrl-C ends the program (main returns 130 without a traceback)
    pressed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def answer(model, tokenizer, fmt, messages, args, generator, interruptible: bool = False) -> str:
    """Stream one assistant answer to stdout, print its speed to stderr, and return its text. With
    ``interruptible``, Ctrl-C stops the answer and what was generated so far is returned."""
    prompt = fmt.encode_dialog(tokenizer, messages)
    if args.penalty is not None:
        args.penalty.start(prompt)
    if args.compile and not args.compiled:
        print(f"(compiling the decode step: about {COMPILE_SECONDS} s, once...)", file=sys.stderr, flush=True)
        args.compiled = True
    token_times: list[float] = []
    start, pieces = time.perf_counter(), []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                    on_token=lambda _: token_times.append(time.perf_counter()))
    # One cache for the whole conversation, so each turn prefills only its new tokens: a static cache that grows,
    # or with --streaming a rolling one. Both run the model's own forward through core's decode loop.
    with (CtrlC() if interruptible else NoCtrlC()) as ctrl_c:
        stream = args.session.stream_text(tokenizer, prompt, args.max_new_tokens, compile=args.compile, **sampling)
        try:
            for piece in stream:
                print(piece, end="", flush=True)
                pieces.append(piece)
                if ctrl_c.pressed:
                    break
        finally:
            stream.close()  # the session records what its cache holds
    if ctrl_c.pressed:
        print("\n(stopped: the answer so far stays in the conversation; Ctrl-C at the prompt leaves)",
              file=sys.stderr, end="")
    n = len(token_times)
    if n:  # the first token comes out of the prefill; the rest are decode steps
        first = 1 if args.compile and n > 2 else 0  # the first compiled decode step may include compiling
        decode = (n - 1 - first) / (token_times[-1] - token_times[first]) if n > 1 else float("nan")
        loaded = f"; model loaded in {args.load_seconds:.2f} s" if getattr(args, "load_seconds", None) else ""
        args.load_seconds = None  # once: with the first answer
        print(f"\n[{n} tokens, {decode:.1f} tok/s decode; prompt {args.session.last_prefill} new tokens "
              f"(of {len(prompt)}) in {token_times[0] - start:.2f} s{loaded}]", file=sys.stderr)
    return "".join(pieces)


def use_cpu_decode_if_possible(model) -> bool:
    """The C++ decode step (minllama-kernels) where it can run; otherwise, or without the package, nothing.
    Returns whether it runs."""
    try:
        from minllama.kernels.cpu_decode import CpuDecodeMixin, cpu_decode_unsupported, use_cpu_decode
        from minllama.kernels.cpu_gemv import extension_built
    except ImportError:
        return False
    if cpu_decode_unsupported(model) is not None:  # e.g. no AVX-512, NF4 or LoRA layers
        return False
    if sys.stderr.isatty() and not extension_built():
        print("(building the C++ decode step, once: ~30 s...)", end="", file=sys.stderr, flush=True)
    use_cpu_decode(model)
    if sys.stderr.isatty():
        print(CLEAR_LINE, end="", file=sys.stderr, flush=True)
    return isinstance(model, CpuDecodeMixin)  # False if the build failed (it warned why)


def load_model(args, dtype: torch.dtype, device: str):
    """(model, tokenizer) from --checkpoint; with --quantize the head (the tied embedding) and then each layer are
    quantized as soon as they are read (minllama-quant's load_pretrained_quantized), so the float model never exists
    whole: SmolLM2 in int8 peaks at ~0.73 GB of RSS while loading, where loading in fp32, then quantizing, took
    1.36 GB."""
    if not args.quantize:
        return load_pretrained(args.checkpoint, dtype=dtype, device=device)
    from minllama.quant import load_pretrained_quantized  # only needed (and installed) for --quantize

    scheme, options = QUANT[args.quantize]
    return load_pretrained_quantized(args.checkpoint, scheme, dtype, device, **options)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = ((device_problem(args.device) if args.device != "auto" else None)
               or utf8_problem("--prompt", args.prompt) or utf8_problem("--system", args.system))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype(args, device)
    if sys.stderr.isatty():  # a person is waiting: say what happens (a pipe gets only the results)
        print(f"(loading {args.checkpoint}...)", end="", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        model, tokenizer = load_model(args, dtype, device)
    except (ValueError, OSError) as e:  # CheckpointError and QuantizationError are ValueErrors
        print(f"{CLEAR_LINE if sys.stderr.isatty() else ''}error: {e}", file=sys.stderr)
        return 2
    args.load_seconds = time.perf_counter() - started  # reported with the first answer's speed
    if sys.stderr.isatty():
        print(CLEAR_LINE, end="", file=sys.stderr, flush=True)
    if tokenizer is None:
        print(f"error: {args.checkpoint} has no tokenizer file (tokenizer.json or tokenizer.model); add one",
              file=sys.stderr)
        return 2
    cpu_decode = device == "cpu" and not (args.compile or args.no_cpu_decode) and use_cpu_decode_if_possible(model)
    if args.quantize:
        from minllama.quant import prepare, set_path
        # the C++ step reads the quantized buffers; a prompt of > 16 tokens dequantizes each matrix as it goes, a
        # shorter one runs in C++: no packed copy of the weights (SmolLM2 Q4_1: 0.69 GB of peak RSS, not 0.83-0.94)
        if cpu_decode:
            set_path(model, "fallback")
        else:
            prepare(model)  # PyTorch's packed kernels' layouts, built now rather than at the first token
    model.kv_cache_dtype = kv_cache_dtype(args, cpu_decode)  # every cache the chat makes follows it
    if args.compile:  # a CUDA build of torch on a machine without CUDA warns about it when it first compiles
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    fmt = chat_format_for(tokenizer)
    args.penalty = RepetitionPenalty(model, args.repetition_penalty) if args.repetition_penalty != 1 else None
    args.compiled = False  # the first compiled decode step is announced (it takes a while)
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
    print(f"Chatting with {args.checkpoint} on {device} ({weights}, loaded in {args.load_seconds:.1f} s). "
          "/reset to start over, /quit to leave.")
    args.load_seconds = None  # said here: not again with the first answer
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
            reply = answer(model, tokenizer, fmt, messages, args, generator, interruptible=True)
        except ValueError as e:  # the conversation outgrew the context window
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})  # all of it, or what came before Ctrl-C


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while loading, in --prompt mode, or twice during one answer: no traceback
        print(file=sys.stderr)
        sys.exit(130)
