"""Data order, loading and device transfer for the training loop.

The order of an epoch is a pure function of ``(seed, epoch)``: a seeded permutation of the
dataset, padded by wrapping around to a multiple of the world size, of which rank ``r`` takes
positions ``r, r + W, r + 2W, …`` (as ``DistributedSampler`` does). With per-process batch
``b``, the ``k``-th batches of all ranks together are exactly positions ``[kbW, (k+1)bW)`` of the
permutation, so ``W`` processes with batch ``b`` see the same samples per step as one process
with batch ``bW``. A sampler can start mid-epoch (``start_batch``), which is how ``--resume``
continues an interrupted epoch on the very same samples.

Exact resume holds for datasets whose items are a function of the index. Random augmentations
drawn inside DataLoader workers use per-epoch worker seeds, which a mid-epoch resume does not
line up again sample by sample.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Seeded, shardable, mid-epoch-resumable sampler over ``range(num_samples)``."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_batch`` per-rank batches."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_order(self) -> list[int]:
        """This rank's whole order for the current epoch (before skipping)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = -(-self.num_samples // self.world_size)  # ceil
        padded = per_rank * self.world_size
        order = order + order[: padded - len(order)] if order else order
        return order[self.rank:padded:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return max(0, -(-self.num_samples // self.world_size) - self.start_batch * self.batch_size)


def build_loader(dataset: Dataset, sampler: ResumableSampler, collate_fn: Callable | None,
                 num_workers: int, pin_memory: bool) -> DataLoader:
    """Training DataLoader: drop_last, persistent workers, and its own seeded generator.

    The explicit generator keeps DataLoader bookkeeping (worker base seeds) off the global
    torch RNG, which the training step owns (dropout and the like).
    """
    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a nested dict/list/tuple batch to ``device`` (non-blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
