"""torch.distributed helpers for commands run under `torchrun`: rank, world, shards, gather to rank 0.

Every helper also works in a plain single process (rank 0 of a world of 1), so callers write one code path:
shard the work with `shard_indices`, compute the local part, `gather_sharded` it to rank 0, and let only
rank 0 write the run directory. Collectives must be called in the same order on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import MemauditError


def env_rank() -> int:
    """This process's rank as torchrun set it (0 in a plain process), readable before any group is up."""
    return int(os.environ.get("RANK", "0"))


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device | None = None, timeout: timedelta | None = None) -> bool:
    """Start the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    Returns True when this call started it. Idempotent; a no-op in a single process. `timeout`: how long a
    collective may wait (ranks that only meet at the end of hours of work need more than the default).
    """
    if not dist.is_available() or env_world() <= 1 or dist.is_initialized():
        return False
    if "MASTER_ADDR" not in os.environ:
        raise MemauditError(f"WORLD_SIZE is {env_world()} but MASTER_ADDR is not set: start several processes with "
                            "`torchrun --nproc-per-node N -m memaudit ...`, or unset WORLD_SIZE")
    use_nccl = device is not None and device.type == "cuda"
    if use_nccl:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_nccl else "gloo", **({"timeout": timeout} if timeout else {}))
    return True


@dataclass
class Group:
    """This process's place among torchrun's ranks (rank 0 of 1 in a plain process) and the device it uses."""
    rank: int
    world: int
    device: torch.device
    started: bool  # this process started the group (and so ends it: `close`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        barrier()

    def sum(self, value: float) -> float:
        """`value` summed over every rank (float64)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        if self.started and dist.is_initialized():
            dist.destroy_process_group()


def join(device: str) -> Group:
    """The group torchrun describes, started if needed, with each rank's device (its own GPU under torchrun)."""
    dev = resolve_device(rank_device(device))
    started = init_from_env(dev)
    return Group(rank=rank(), world=world_size(), device=dev, started=started)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start(device: str, model_device: torch.device | None = None) -> str:
    """Join torchrun's processes, if any, for a command that runs on `device` (gloo on CPU, NCCL on CUDA; an
    already loaded model's `model_device` decides when given). Returns this rank's device (its own GPU)."""
    dev = rank_device(device)
    init_from_env(model_device or torch.device("cpu" if dev == "auto" else dev))
    return dev


def rank_device(device: str) -> str:
    """Under torchrun each rank uses its own GPU: `auto`/`cuda` become `cuda:<local rank>`."""
    if env_world() > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{local_rank()}"
    return device


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's items out of n: every world-th one starting at rank (strided, so lengths balance)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, n, w))


def shard_todo(todo: Sequence[int], rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's share of the items still to do (strided over them, as shard_indices): after a resume the ranks
    split what is left evenly, whichever items an earlier run finished."""
    return [todo[i] for i in shard_indices(len(todo), rank_, world)]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def gather_sharded(local: Sequence[Any], indices: Sequence[int], n: int) -> list[Any] | None:
    """Reassemble per-item results computed for `indices` on each rank into one list of n on rank 0."""
    parts = gather_object((list(indices), list(local)))
    if parts is None:
        return None
    full: list[Any] = [None] * n
    for idx, vals in parts:
        for i, v in zip(idx, vals):
            full[i] = v
    return full


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: every rank waits for the others, then destroys it.

    Without this a rank can exit while a peer still holds its gloo connections; PyTorch asks for an explicit
    destroy_process_group, and one suite run saw a rank abort (SIGABRT) at exit. A no-op when no group is up.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
