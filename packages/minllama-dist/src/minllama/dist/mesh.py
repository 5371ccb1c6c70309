"""The device mesh of N-D parallel training: the ranks arranged in a grid, one named dimension per kind of split.

    world = pp x dp_shard x cp x tp          (outermost to innermost)

    pp        pipeline stages: each holds a slice of the layers
    dp_shard  data parallel + FSDP: each gets other rows of the batch and holds 1/dp_shard of every weight
    cp        context parallel: each holds a slice of the sequence through attention
    tp        tensor parallel: each holds a slice of every weight matrix (and, with sequence parallel, of the
              sequence between blocks)

Rank r sits at the grid point whose row-major index is r, so the innermost dimension (tp) groups neighbouring
ranks: on a machine of 8 GPUs, tp=8 keeps the chattiest split (two collectives per sub-layer) on the fastest links.
A sub-mesh, ``mesh["tp"]``, is the 1-D group of the ranks that differ only in that coordinate: what
``parallelize_module`` or ``fully_shard`` is given. dp_shard is what is left: world / (pp * cp * tp).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from minllama.core import LlamaConfig

from .parallelize import check_tensor_parallel

MESH_DIMS = ("pp", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class MeshShape:
    """How many ranks each dimension spans; their product is the world size."""

    pp: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)

    @property
    def world(self) -> int:
        return self.pp * self.dp_shard * self.cp * self.tp


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plan_mesh(world: int, *, tp: int = 1, pp: int = 1, cp: int = 1, dp_shard: int | None = None,
              cfg: LlamaConfig | None = None, seq_len: int | None = None) -> MeshShape:
    """Check the requested degrees against the world size (and the model and sequence, when given) and return the
    mesh shape; dp_shard, when None, is derived: world / (pp * cp * tp). Each problem is one ValueError that says
    what does not divide what, and which values would."""
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("dp_shard", dp_shard)):
        if value is None and name == "dp_shard":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: a parallel degree is a whole number >= 1")
    inner = pp * cp * tp
    if world % inner:
        raise ValueError(f"pp x cp x tp = {pp} x {cp} x {tp} = {inner} does not divide the world size {world}: the "
                         f"ranks are a grid, so pp * cp * tp must be one of {_divisors(world)}")
    if dp_shard is None:
        dp_shard = world // inner
    elif dp_shard * inner != world:
        raise ValueError(f"pp x dp_shard x cp x tp = {pp} x {dp_shard} x {cp} x {tp} = {dp_shard * inner} is not "
                         f"the world size {world}: leave --dp-shard out (it is derived: {world // inner}) or change "
                         f"the number of processes")
    if cfg is not None:
        if tp > 1:
            check_tensor_parallel(cfg, tp)
        if cfg.n_layers % pp:
            raise ValueError(f"n_layers={cfg.n_layers} does not split into pp={pp} pipeline stages: use --pp in "
                             f"{_divisors(cfg.n_layers)}")
    if seq_len is not None and cp > 1:  # context parallel first: each ring rank 2 chunks of ceil(T / 2cp) (padded)
        local = 2 * -(-seq_len // (2 * cp))
        if local % tp:
            raise ValueError(f"--seq-len {seq_len} over cp = {cp} ranks gives each {local} tokens, which do not "
                             f"split over tp = {tp} ranks (sequence parallel splits each ring rank's tokens again): "
                             f"use a multiple of 2 * cp * tp = {2 * cp * tp}")
    elif seq_len is not None and seq_len % tp:
        raise ValueError(f"--seq-len {seq_len} does not split over tp = {tp} ranks (sequence parallel gives each tp "
                         f"rank seq_len / tp positions): use a multiple of {tp}")
    return MeshShape(pp=pp, dp_shard=dp_shard, cp=cp, tp=tp)


def build_mesh(shape: MeshShape, device_type: str = "cpu") -> DeviceMesh:
    """The 4-D mesh (pp, dp_shard, cp, tp) over the current process group; dimensions of size 1 are kept, so code
    can always ask for ``mesh["tp"]`` or ``mesh["dp_shard"]``. Every rank calls it (it creates process groups)."""
    return init_device_mesh(device_type, shape.sizes, mesh_dim_names=MESH_DIMS)
