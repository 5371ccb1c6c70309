"""Tensor-parallel serving: one engine per rank, kept in lockstep by rank 0.

A tensor-parallel forward is a collective: every rank must run the same forward, on the same tokens, at the same
time, each with its slice of the weights (``tp.py``) and its slice of the KV cache (its own kv heads). The engine
(core's ``Engine``: scheduler, block tables, prefix cache) decides what each forward holds. Instead of sending those
decisions (token ids, positions, block tables, slot numbers) every step, every rank runs its *own* engine, and rank 0
makes them agree by sending each one the same inputs in the same order: the requests that arrived and the ones
cancelled since the last step, then "step". An engine is deterministic given that sequence of calls, so the
followers' schedulers, block tables and caches stay identical to rank 0's without ever being sent:

    rank 0 (HTTP + its engine)                     ranks 1..N-1 (``follow``: their engines)
    submit(r7), cancel(r3)   -> recorded
    step()  --- broadcast [submit r7, cancel r3, step] --->  submit(r7); cancel(r3); step()
            the forwards of the step run together: their all-reduces meet (tp.py)

The logits after the last all-reduce are the same on every rank, so sampling agrees too, provided every request's
random numbers are the same everywhere: rank 0 gives each unseeded request a seed before sending it. One small
pickled message per step; while idle, rank 0 sends a heartbeat every few seconds, so that a follower waiting for
the next step is not taken for dead by the process group's timeout. A rank that dies ends the others with an error
(the broadcast fails, or times out) instead of a hang.
"""
from __future__ import annotations

import random
import time

import torch.distributed as dist

from minllama.core.engine import Engine, Request

SPEC = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids")  # what a follower needs


class FollowerLost(RuntimeError):
    """The broadcast to the followers failed: one of them is gone, and no forward can run without it."""


class LockstepEngine:
    """Rank 0's engine: the ``Engine`` interface (``submit``, ``cancel``, ``step``, ``idle``, ``cache``, ...), each
    call also recorded for the followers, who get the record with the order to step."""

    fatal_errors = (FollowerLost,)  # a server cannot go on after one of these: no forward can run

    def __init__(self, engine: Engine, heartbeat_s: float = 5.0):
        self.engine, self.heartbeat_s = engine, heartbeat_s
        self.events: list[tuple] = []
        self.last_sent = time.monotonic()

    def __getattr__(self, name):  # idle, running, waiting, cache, stats, blocks_in_use ...: rank 0's engine's
        return getattr(self.engine, name)

    def submit(self, request: Request) -> Request:
        if request.seed is None:  # the followers must draw the same random numbers: a seed for every request
            request.seed = random.getrandbits(63)
        self.engine.submit(request)  # a ValueError here is not recorded: the followers would only raise it too
        self.events.append(("submit", {k: list(v) if k in ("prompt", "stop_ids") else v
                                       for k, v in ((k, getattr(request, k)) for k in SPEC)}))
        return request

    def cancel(self, request: Request) -> None:
        self.engine.cancel(request)
        self.events.append(("cancel", request.id))

    def step(self):
        self._send([*self.events, ("step",)])
        self.events = []
        return self.engine.step()

    def heartbeat(self) -> None:
        """Called while idle: keeps the followers' wait shorter than the group's timeout (and hands them any
        cancellation recorded meanwhile)."""
        if time.monotonic() - self.last_sent >= self.heartbeat_s:
            self._send([*self.events, ("ping",)])
            self.events = []

    def close(self) -> None:
        """The followers return from ``follow``."""
        self._send([("stop",)])

    def _send(self, events: list[tuple]) -> None:
        try:
            dist.broadcast_object_list([events], src=0)
        except Exception as e:  # noqa: BLE001 -- gloo and NCCL raise different types for a peer that is gone
            raise FollowerLost(f"a tensor-parallel follower is gone ({type(e).__name__}: {str(e)[:200]}): "
                               "every forward needs all ranks; restart the server") from None
        self.last_sent = time.monotonic()


def follow(engine: Engine) -> dict[str, int]:
    """Ranks 1..N-1: apply rank 0's calls to this rank's engine until rank 0 says stop. Returns counts of what was
    done (for tests and logs). Raises RuntimeError naming the problem if rank 0 stops answering."""
    requests: dict[int, Request] = {}
    done = {"submitted": 0, "cancelled": 0, "steps": 0}
    while True:
        message = [None]
        try:
            dist.broadcast_object_list(message, src=0)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"rank 0 of the tensor-parallel server stopped answering ({type(e).__name__}: "
                               f"{str(e)[:200]}): this follower exits") from None
        for kind, *payload in message[0]:
            if kind == "submit":
                try:
                    request = engine.submit(Request(**payload[0]))
                except ValueError:  # rank 0 does not send what it refused; a mismatch is a bug: say so
                    raise RuntimeError("a request rank 0 accepted was refused here: the ranks' engines differ "
                                       "(same checkpoint and options on every rank?)") from None
                requests[request.id] = request
                done["submitted"] += 1
            elif kind == "cancel" and payload[0] in requests:
                engine.cancel(requests.pop(payload[0]))
                done["cancelled"] += 1
            elif kind == "step":
                try:
                    engine.step()
                except Exception:  # noqa: BLE001 -- rank 0 fails the same step and cancels its requests next
                    pass
                done["steps"] += 1
                requests = {i: r for i, r in requests.items() if not r.done}
            elif kind == "stop":
                return done
