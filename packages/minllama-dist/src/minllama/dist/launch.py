"""Joining a process group: one function that works under torchrun, on CUDA (NCCL) or on the CPU (gloo).

torchrun starts one process per device and tells each who it is through environment variables:

    RANK        this process's index among all processes (0 .. WORLD_SIZE-1)
    LOCAL_RANK  its index on this machine (which GPU to use)
    WORLD_SIZE  how many processes in total
    MASTER_ADDR, MASTER_PORT   where rank 0 listens, so that the others can find it (the "rendezvous")

``init_distributed()`` reads them, picks the device (``cuda:LOCAL_RANK`` when a GPU is there, else the CPU) and the
matching backend (NCCL for GPUs, gloo for CPUs), and joins the group. Run as a plain ``python`` process without
those variables, it makes a group of one, so the same training code runs everywhere unchanged.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT = timedelta(minutes=10)


def pick_device(local_rank: int | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (and not disabled by ``MINLLAMA_DEVICE=cpu``), else the CPU."""
    wanted = os.environ.get("MINLLAMA_DEVICE", "")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    return torch.device("cuda", local_rank)


def free_port() -> int:
    """A TCP port nobody listens on (for a single-machine rendezvous started from Python)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT, device: torch.device | None = None) -> torch.device:
    """Join (or create) the default process group and return this process's device.

    Every collective that waits longer than ``timeout`` raises instead of hanging forever (a crashed peer, a rank
    that took another code path). Without torchrun's variables this makes a group of one on 127.0.0.1.
    """
    device = device or pick_device()
    if dist.is_initialized():
        return device
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return device


def data_parallel_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every rank: the ranks that shard the model (FSDP) or split the heads (TP)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
