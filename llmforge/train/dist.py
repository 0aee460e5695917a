"""Process-group setup for data-parallel training (torchrun / Slurm / ``mp.spawn`` in tests).

torchrun exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; when they are
present ``setup()`` joins the process group (NCCL on CUDA, gloo on CPU). Without them training runs as a
single process and every collective here is a no-op, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def setup(device_type: str) -> DistEnv:
    """Join the process group described by the environment (idempotent); single process otherwise."""
    if not in_torchrun():
        return DistEnv()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {}
        if device_type == "cuda":
            # bind the rank to its GPU before NCCL starts, or every rank opens a context on GPU 0
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        tdist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        # tearing down after a peer failed: the original error is what the user needs
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if tdist.is_available() and tdist.is_initialized():
        out: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if tdist.is_available() and tdist.is_initialized():
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
