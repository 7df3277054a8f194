"""Data order, loading and device transfer for the training loop.

The order of an epoch is :class:`~torch.utils.data.DistributedSampler`'s: a seeded permutation,
padded to a multiple of the world size ``W``, of which rank ``r`` takes positions ``r, r + W, …``.
With per-process batch ``b`` the ``k``-th batches of all ranks are positions ``[kbW, (k+1)bW)``, so
``W`` processes with batch ``b`` see the samples one process sees with batch ``bW``. Starting
mid-epoch (``start_batch``) lets ``--resume`` continue on the very same samples; exactly so for
datasets whose items are a function of the index (random augmentations in DataLoader workers use
per-epoch worker seeds, which a mid-epoch resume does not line up again).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Seeded, shardable, mid-epoch-resumable sampler over ``range(num_samples)``.

    The epoch's permutation is seeded with :attr:`epoch_seed` (``seed × 100 003 + epoch``; scaling keeps
    (seed, epoch) pairs apart), which the training DataLoader's generator follows too. The attributes
    ``num_samples`` and ``seed`` keep DistributedSampler's meaning (samples per rank; the scaled seed).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(range(int(num_samples)), num_replicas=world_size, rank=rank, seed=int(seed) * 100_003)
        self.batch_size = int(batch_size)
        self.start_batch = 0

    @property
    def epoch_seed(self) -> int:
        return self.seed + self.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_batch`` per-rank batches."""
        super().set_epoch(int(epoch))
        self.start_batch = int(start_batch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_batch * self.batch_size, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)


def build_loader(dataset: Dataset, sampler: ResumableSampler, collate_fn: Callable | None,
                 num_workers: int, device: torch.device) -> DataLoader:
    """Training DataLoader: drop_last, persistent workers, pinned batches on CUDA (for :func:`to_device`'s
    asynchronous copies), and its own generator (seeded per epoch by the trainer), which keeps worker
    base seeds off the global torch RNG that the training step owns (dropout and the like)."""
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=num_workers > 0, generator=torch.Generator())


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a nested dict/list/tuple batch to ``device`` (non-blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # namedtuple or not
    return batch
