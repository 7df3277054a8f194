"""``torchrun`` support: detect the launch, hold the process group.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the engine creates the default
process group (``nccl`` on CUDA, ``gloo`` on CPU) unless the caller did, wraps the task in
``DistributedDataParallel`` (``find_unused_parameters=False``: every trainable parameter must take
part in each forward) and shards the data. Only rank 0 writes files and prints; it validates alone
and broadcasts the metrics, so every rank takes the same best/early-stopping decisions.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from ..device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect() -> DistInfo:
    """Read the torchrun environment (a plain ``python`` run is rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(int(os.environ["RANK"]), world) if world > 1 else DistInfo()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        dist.barrier()


@contextlib.contextmanager
def process_group(device_spec: str = "auto") -> Iterator[DistInfo]:
    """The torchrun process group for the duration of the context, created here unless it exists.
    ``Trainer.fit`` holds it for one training; a recipe with several (two stages) holds it across them,
    since re-creating the default group between stages can deadlock the rendezvous."""
    info = detect()
    created = info.enabled and not dist.is_initialized()
    if created:
        device = resolve_device(device_spec)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield info
    finally:
        if created:
            dist.destroy_process_group()
