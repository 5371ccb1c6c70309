"""Count the bytes a rank sends, by kind of collective: the measured side of ``estimate.py``.

Two doors lead to the wire, and both are watched while a ``CountedTraffic`` block runs:

    torch.distributed.<fn>          what FSDP2 (all_gather_single, reduce_scatter_single), the pipeline schedules
                                    (isend in a P2POp), the ring of context parallel and DDP-style
                                    all-reduces call: the functions are wrapped (and restored on exit)
    torch.ops._c10d_functional.*    what DTensor's redistributions (tensor parallel) dispatch: seen by a
                                    TorchDispatchMode, the same mechanism as PyTorch's CommDebugMode

A collective's "bytes sent" is what each rank puts on the wire with the ring algorithm: an all-gather or a
reduce-scatter of a full tensor of S bytes over n ranks sends (n-1)/n x S per rank, an all-reduce twice that, a
send its tensor. The numbers are algorithm volumes: a backend may move them differently, but they scale the same way.
"""
from __future__ import annotations

import functools
import inspect
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return dist.get_world_size(group)


class CountedTraffic(TorchDispatchMode):
    """``with CountedTraffic() as traffic: ...`` then ``traffic.sent`` = {kind: bytes sent by this rank}."""

    def __init__(self):
        super().__init__()
        self.sent: dict[str, int] = defaultdict(int)

    # ---- the torch.distributed functions: name -> (kind, bytes sent, from the call's arguments by name)
    @staticmethod
    def _c10d_rules():
        ring = lambda t, g: _nbytes(t) * (_size(g) - 1) // _size(g)  # noqa: E731
        gathered = lambda a: ring(a.get("output_tensor", a.get("output")), a.get("group"))  # noqa: E731
        scattered = lambda a: ring(a.get("input_tensor", a.get("input")), a.get("group"))  # noqa: E731
        return {
            "all_gather_single": ("all-gather", gathered),
            "all_gather_into_tensor": ("all-gather", gathered),
            "reduce_scatter_single": ("reduce-scatter", scattered),
            "reduce_scatter_tensor": ("reduce-scatter", scattered),
            "all_reduce": ("all-reduce", lambda a: 2 * ring(a["tensor"], a.get("group"))),
            "send": ("send/recv", lambda a: _nbytes(a["tensor"])),
        }

    def __enter__(self):
        self._saved = {}
        for name, (kind, count) in self._c10d_rules().items():
            original = getattr(dist, name)
            self._saved[name] = original
            signature = inspect.signature(original)

            @functools.wraps(original)
            def counted(*args, _original=original, _kind=kind, _count=count, _sig=signature, **kwargs):
                self.sent[_kind] += _count(_sig.bind(*args, **kwargs).arguments)
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        # isend stays unwrapped (a P2POp accepts only the original function, compared by identity): the
        # point-to-point sends of the pipeline schedules and of the ring are counted when their P2POp is made
        self._p2p_init = dist.P2POp.__init__

        @functools.wraps(self._p2p_init)
        def p2p_init(op_self, op, tensor, *args, **kwargs):
            if op is dist.isend:
                self.sent["send/recv"] += _nbytes(tensor)
            self._p2p_init(op_self, op, tensor, *args, **kwargs)

        dist.P2POp.__init__ = p2p_init
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)
        dist.P2POp.__init__ = self._p2p_init
        return super().__exit__(*exc)

    # ---- DTensor's functional collectives
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run first: it turns into the plain collectives counted below
        name = func._overloadpacket.__name__ if func.namespace == "_c10d_functional" else None
        if name == "all_gather_into_tensor":  # (input, group_size, group_name): out = group_size x input
            n = args[1]
            self.sent["all-gather"] += _nbytes(args[0]) * (n - 1)
        elif name == "reduce_scatter_tensor":  # (input, op, group_size, group_name)
            n = args[2]
            self.sent["reduce-scatter"] += _nbytes(args[0]) * (n - 1) // n
        elif name == "all_reduce":  # (input, op, group_name)
            n = dist.get_world_size(dist.distributed_c10d._resolve_process_group(args[2]))
            self.sent["all-reduce"] += 2 * _nbytes(args[0]) * (n - 1) // n
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.sent.values())
