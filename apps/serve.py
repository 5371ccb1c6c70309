"""An OpenAI-compatible HTTP server on MinimalLlama's engine (continuous batching, paged KV cache, prefix caching).

    uv run apps/serve.py                                   # the embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    uv run apps/serve.py --checkpoint path/to/model --port 8080 --max-batch 32 --kv-memory 512
    uv run torchrun --nproc-per-node 3 apps/serve.py --tp 3  # tensor parallel: 3 processes, rank 0 serves HTTP

Any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions and /v1/completions (``stream`` with server-sent events, or one JSON reply),
GET /v1/models, GET /health. How it works: one thread owns the model and runs the engine's loop (admit, prefill a
chunk, one batched decode step); each HTTP request submits a ``Request`` and waits on its own queue of tokens, so
requests of any length join and leave the batch between steps. A client that goes away is cancelled at once
(its KV blocks go back to the pool). Bad requests get OpenAI-shaped JSON errors with a 4xx status.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

# No pool of MKL's GEMM buffers, as in chat.py (why: there): set before torch starts.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request as HTTPRequest  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from minllama.core.chat_format import chat_format_for  # noqa: E402
from minllama.core.checkpoint import load_pretrained  # noqa: E402
from minllama.core.dtypes import DTYPE_HELP, DTYPES  # noqa: E402
from minllama.core.engine import Engine, Request  # noqa: E402
from minllama.core.tokenizer import StreamDecoder  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from chat import QUANT, model_dtype  # noqa: E402  (the same --quantize choices and dtype rule as the chat)


# ------------------------------------------------------------------------------------------- the engine thread
class EngineThread:
    """The only thread that touches the model. HTTP handlers ``submit`` and ``cancel``; each produced token is
    handed to the request's asyncio queue on the server's event loop (None marks the end)."""

    def __init__(self, engine: Engine):
        self.engine, self.inbox = engine, queue.Queue()
        self.listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True, name="engine")
        self.thread.start()

    def submit(self, request: Request) -> asyncio.Queue:
        out: asyncio.Queue = asyncio.Queue()
        self.inbox.put(("submit", request, (asyncio.get_running_loop(), out)))
        return out

    def cancel(self, request: Request) -> None:
        self.inbox.put(("cancel", request, None))

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop between two steps (a tensor-parallel lead then tells its followers to stop)."""
        self.inbox.put(("stop", None, None))
        self.thread.join(timeout)

    def _loop(self) -> None:
        # A tensor-parallel lead (minllama.dist.serving.LockstepEngine) must keep its followers from timing out
        # while idle, and cannot go on without them: its errors of that kind end the server.
        heartbeat, fatal = getattr(self.engine, "heartbeat", None), getattr(self.engine, "fatal_errors", ())
        try:
            while self._turn(heartbeat):
                pass
        except fatal as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(1)

    def _turn(self, heartbeat) -> bool:
        try:  # block while idle (waking every second to keep followers alive); between steps, take what has arrived
            self._handle(*self.inbox.get(block=self.engine.idle, timeout=1.0 if heartbeat else None))
            while True:
                self._handle(*self.inbox.get_nowait())
        except queue.Empty:
            pass
        except StopIteration:
            if hasattr(self.engine, "close"):
                self.engine.close()
            return False
        if self.engine.idle:
            if heartbeat:
                heartbeat()
            return True
        try:
            produced = self.engine.step()
        except getattr(self.engine, "fatal_errors", ()):
            raise
        except Exception as e:  # noqa: BLE001 -- the server must not die: fail the running requests, go on
            logging.exception("engine step failed")
            for seq in list(self.engine.running) + list(self.engine.waiting):
                self.engine.cancel(seq.request)
                self._send(seq.request, e)
            return True
        for request, token in produced:
            self._send(request, token)
        for request in [r for r in self._pending() if r.done]:
            self._send(request, None)
        return True

    def _handle(self, kind: str, request: Request, listener) -> None:
        if kind == "stop":
            raise StopIteration
        if kind == "submit":
            try:
                self.engine.submit(request)
            except ValueError as e:
                loop, out = listener
                loop.call_soon_threadsafe(out.put_nowait, e)
                return
            self.listeners[request.id] = (*listener, request)
        elif request.id in self.listeners:
            self.engine.cancel(request)
            self.listeners.pop(request.id)

    def _pending(self):
        return [entry[2] for entry in self.listeners.values()]

    def _send(self, request: Request, item) -> None:
        entry = self.listeners.get(request.id)
        if entry is None:
            return
        loop, out, _ = entry
        if item is None or isinstance(item, Exception):
            self.listeners.pop(request.id)
        loop.call_soon_threadsafe(out.put_nowait, item)


# ------------------------------------------------------------------------------------------- the API's shapes
class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(Sampling):
    prompt: str


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# ------------------------------------------------------------------------------------------- the app
def make_app(model, tokenizer, model_name: str, engine: Engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        # uvicorn's graceful shutdown (Ctrl-C, SIGTERM) ends here before it re-raises the signal: the engine thread
        # stops between two steps (a tensor-parallel lead then tells its followers to stop)
        worker.stop()

    app = FastAPI(title="MinimalLlama", docs_url=None, redoc_url=None, lifespan=lifespan)
    worker = EngineThread(engine)
    fmt = chat_format_for(tokenizer)
    context = model.config.max_seq_len

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):  # OpenAI answers 400, FastAPI's default is 422
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(BadRequest)
    async def bad(_, exc: BadRequest):
        return error(exc.status, str(exc), exc.param)

    @app.get("/health")
    async def health():
        in_use = engine.blocks_in_use()
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "kv_blocks_in_use": in_use, "kv_blocks_free": engine.cache.pool.n_blocks - in_use}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "minllama"}]}

    def requests_for(body: Sampling, prompt: list[int]) -> list[Request]:
        if body.model != model_name:
            raise BadRequest(404, f"the model {body.model!r} does not exist: this server serves {model_name!r}",
                             "model")
        if len(prompt) >= context:
            raise BadRequest(400, f"the prompt has {len(prompt)} tokens but the model's context is {context}: "
                                  "shorten it", "messages" if isinstance(body, ChatBody) else "prompt")
        room = context - len(prompt)
        if body.max_tokens is not None and body.max_tokens > room:
            raise BadRequest(400, f"max_tokens={body.max_tokens} does not fit: the prompt has {len(prompt)} tokens "
                                  f"and the context {context}; ask for at most {room}", "max_tokens")
        budget = body.max_tokens or room
        return [Request(prompt, budget, temperature=body.temperature, top_p=body.top_p,
                        seed=None if body.seed is None else body.seed + i, stop_ids=tokenizer.stop_ids)
                for i in range(body.n)]

    async def answer(request: Request, out: asyncio.Queue, stops: list[str]):
        """Yield the answer's text pieces; the last item is the finish reason. Stop strings end it early."""
        decoder, pending = StreamDecoder(tokenizer), ""
        while True:
            item = await out.get()
            if isinstance(item, Exception):
                raise BadRequest(400, str(item))
            if item is None:
                yield pending + decoder.flush()
                yield "length" if request.finish_reason == "length" else "stop"
                return
            if item in tokenizer.stop_ids:
                continue
            pending += decoder.push(item)
            hits = [pending.index(s) for s in stops if s in pending]
            if hits:
                worker.cancel(request)
                yield pending[:min(hits)]
                yield "stop"
                return
            hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
            if len(pending) > hold:
                yield pending[:len(pending) - hold]
                pending = pending[len(pending) - hold:]

    async def serve(body: Sampling, prompt: list[int], http: HTTPRequest, chat: bool):
        requests = requests_for(body, prompt)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        queues = [worker.submit(r) for r in requests]
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(i: int, text: str | None, finish: str | None, delta: bool):
            if not chat:
                return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            body_key = "delta" if delta else "message"
            content = {"content": text} if delta else {"role": "assistant", "content": text or ""}
            if delta and text is None:
                content = {}
            return {"index": i, body_key: content, "finish_reason": finish}

        def usage():
            done = sum(len(r.output) for r in requests)
            return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

        if not body.stream:
            choices = []
            try:
                for i, (r, q) in enumerate(zip(requests, queues)):
                    pieces = [p async for p in answer(r, q, stops)]
                    choices.append(choice(i, "".join(pieces[:-1]), pieces[-1], delta=False))
            finally:
                for r in requests:
                    worker.cancel(r)
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices,
                    "usage": usage()}

        async def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            try:
                if chat:
                    yield sse({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                               "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None} for i in range(len(requests))]})
                for i, (r, q) in enumerate(zip(requests, queues)):
                    pieces = answer(r, q, stops)
                    previous = None
                    async for piece in pieces:
                        if previous is not None and previous:
                            yield sse({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                                       "choices": [choice(i, previous, None, delta=True)]})
                        previous = piece
                    yield sse({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                               "choices": [choice(i, None, previous, delta=True)]})
                yield sse({"id": rid, "object": chunk_kind, "created": created, "model": model_name,
                           "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the blocks now
                for r in requests:
                    worker.cancel(r)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] == "assistant":
            raise BadRequest(400, "the last message is the assistant's: end with a user message", "messages")
        try:
            prompt = fmt.encode_dialog(tokenizer, messages)
        except ValueError as e:
            raise BadRequest(400, str(e), "messages") from None
        return await serve(body, prompt, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = tokenizer.encode(body.prompt)
        if not prompt:
            raise BadRequest(400, "the prompt is empty", "prompt")
        return await serve(body, prompt, http, chat=False)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ------------------------------------------------------------------------------------------- the command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a Llama model with an OpenAI-compatible HTTP API (MinimalLlama).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="smollm2-135m-instruct",
                   help="a known name, a .gguf file, an HF directory or a Meta directory")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: --checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help=DTYPE_HELP)
    p.add_argument("--quantize", choices=list(QUANT), help="quantize the weights after loading (minllama-quant)")
    p.add_argument("--max-batch", type=int, default=16, help="at most this many sequences decode together")
    p.add_argument("--kv-memory", type=float, default=256, help="MiB of KV cache (the paged pool), all layers")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens fed per engine step")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not share the KV blocks of common prefixes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel over this many processes, started by torchrun: `uv run torchrun "
                        "--nproc-per-node N apps/serve.py --tp N` (rank 0 serves HTTP; the heads must divide: "
                        "SmolLM2-135M's 9 query and 3 kv heads take --tp 3)")
    args = p.parse_args(argv)
    if args.tp < 1:
        p.error("--tp must be >= 1")
    for name in ("max_batch", "block_size", "prefill_chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.kv_memory) and args.kv_memory > 0):
        p.error("--kv-memory must be a positive number of MiB")
    return args


def build(args, device="cpu", tp_mesh=None) -> tuple:
    """(model, tokenizer, engine) as the options say; with ``tp_mesh``, this rank's tensor-parallel slice."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.checkpoint, dtype=model_dtype(args, device), device=device)
    if tokenizer is None:
        raise SystemExit(f"error: {args.checkpoint} has no tokenizer: add tokenizer.json or tokenizer.model")
    if tp_mesh is not None:
        from minllama.dist import apply_tensor_parallel

        try:
            apply_tensor_parallel(model, tp_mesh)  # each rank: its heads, its slice of the MLP, its KV cache
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.quantize:
        from minllama.quant import prepare, quantize

        scheme, options = QUANT[args.quantize]
        prepare(quantize(model, scheme, **options))
    engine = Engine(model, block_size=args.block_size, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    kv_bytes=int(args.kv_memory * 2**20), prefix_caching=not args.no_prefix_cache)
    return model, tokenizer, engine


def serve_http(app: FastAPI, args, what: str) -> None:
    """Say where the server listens (tests wait for /health), then serve until Ctrl-C or SIGTERM."""
    print(f"serving {args.model_name or args.checkpoint} on http://{args.host}:{args.port}/v1, {what}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def main_tensor_parallel(args) -> int:
    """``--tp N`` under torchrun: every rank loads the model, keeps its slice, and runs its own engine; rank 0
    serves HTTP and keeps the others' engines in lockstep with its own (minllama.dist.serving)."""
    from datetime import timedelta

    from minllama.dist import data_parallel_mesh, init_distributed, shutdown
    from minllama.dist.serving import LockstepEngine, follow

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise SystemExit(f"error: --tp {args.tp} needs {args.tp} processes, started with {world}: run `uv run "
                         f"torchrun --nproc-per-node {args.tp} apps/serve.py --tp {args.tp}`")
    device = init_distributed(timeout=timedelta(seconds=60))  # a rank silent for a minute is an error, not a hang
    model, tokenizer, engine = build(args, device, data_parallel_mesh(device))
    try:
        if int(os.environ["RANK"]):
            # Ctrl-C or torchrun's SIGTERM reach every rank: a follower leaves when rank 0 has stopped cleanly and
            # says so (or when rank 0 is gone: the next broadcast fails)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            follow(engine)
            return 0
        engine = LockstepEngine(engine)
        app = make_app(model, tokenizer, args.model_name or args.checkpoint, engine)
        serve_http(app, args, f"tensor parallel over {world} ranks ({engine.cache.pool.n_blocks} KV blocks of "
                              f"{args.block_size} tokens per rank)")
        return 0
    except RuntimeError as e:  # rank 0 gone (a follower's view)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tp > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return main_tensor_parallel(args)
    model, tokenizer, engine = build(args)
    app = make_app(model, tokenizer, args.model_name or args.checkpoint, engine)
    serve_http(app, args, f"{engine.cache.pool.n_blocks} KV blocks of {args.block_size} tokens, batch up to "
                          f"{args.max_batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
