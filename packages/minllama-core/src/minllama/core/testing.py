"""Tools for testing code that writes checkpoints: what every package's kill -9 tests share.

A save must survive being killed at any instant. ``kill_during`` runs it in a forked child that counts its
file-system steps and SIGKILLs itself right before the chosen one, so a test can kill a save at *every* step, then
check that what is left on disk is the old checkpoint or the new one.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable

FS_STEPS = ("replace", "rename", "unlink", "fsync")  # the steps of core's save protocol (saving.py)


def kill_during(work: Callable[[], object], die_at_call: int | None = None, steps: tuple[str, ...] = FS_STEPS) -> bool:
    """Run ``work()`` in a forked child that SIGKILLs itself right before its ``die_at_call``-th call of an ``os``
    function named in ``steps``. True if the child was killed, False if ``work`` completed (None: never killed)."""
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at the chosen one
        try:
            calls = [0]

            def step(real):
                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == die_at_call:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return wrapped

            for name in steps:
                setattr(os, name, step(getattr(os, name)))
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
