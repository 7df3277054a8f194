"""``TrainConfig``: every setting of the training engine, and the learning-rate schedule it sets.

``batch_size`` is the micro-batch of ONE process (one DataLoader batch); an optimiser step sees
``batch_size × grad_accum × world_size`` samples (the effective batch, recorded in ``config.json``).

The schedule is stepped once per optimiser step. With ``T`` total steps and ``W = floor(warmup_ratio · T)``
warm-up steps, update ``s`` (0-based) uses ``lr · (s + 1) / W`` for ``s < W`` (the first update already
moves; the W-th reaches ``lr``), then ``lr · ½ (1 + cos(π (s − W) / (T − W)))``, which is 0 at ``s = T``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..device import PRECISIONS
from ..errors import TrainingError, check_field_kinds

#: Fields whose change alters the computation; a resume must keep them identical.
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "betas", "eps", "warmup_ratio", "grad_accum", "seed",
                   "max_grad_norm", "max_steps")


@dataclass
class TrainConfig:
    """Optimiser, schedule, precision, data loading and bookkeeping of one training run; the defaults
    are the paper's recipe (docs/protocols.md §1)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    seed: int = 0
    patience: int | None = None  # epochs without improvement before stopping; None = off
    num_workers: int | None = None  # None: mora_retrieval.device.default_num_workers (CUDA: cores - 1, CPU: 0)
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu) or a torch device
    checkpoint_every: int | None = None  # optimiser steps between mid-epoch checkpoints
    max_grad_norm: float | None = None  # gradient clipping; None = off
    log_every: int = 50  # optimiser steps between loss syncs (progress, NaN guard)
    max_steps: int | None = None  # stop after this many optimiser steps (also shortens the schedule)

    def __post_init__(self) -> None:
        check_field_kinds(self, TrainingError, "train config")
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "checkpoint_every", "max_steps", "patience"):
            value, optional = getattr(self, name), name in ("checkpoint_every", "max_steps", "patience")
            if value is not None and value < 1:  # check_field_kinds: an int, None only where optional
                expected = "a positive integer or None" if optional else "a positive integer"
                raise TrainingError(f"train config: {name} must be {expected}, got {value!r}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise TrainingError(f"train config: need lr > 0, eps > 0, weight_decay >= 0 "
                                f"(got {self.lr}, {self.eps}, {self.weight_decay})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TrainingError(f"train config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise TrainingError(f"train config: betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"train config: precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {self.precision!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise TrainingError(f"train config: num_workers must be >= 0, got {self.num_workers}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise TrainingError(f"train config: max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    def steps_per_epoch(self, samples: int, world_size: int = 1) -> int:
        """Optimiser steps an epoch of ``samples`` gives: full *global* batches only (the sampler's padded
        tail is unused, so ``W`` ranks take as many steps as one process with ``W`` times the batch),
        grouped by ``grad_accum``."""
        return samples // (self.batch_size * world_size) // self.grad_accum

    def check_fits(self, samples: int, what: str = "training set", world_size: int = 1) -> None:
        """One line, before anything is written, when ``samples`` give no full optimiser step."""
        if self.steps_per_epoch(samples, world_size) == 0:
            raise TrainingError(
                f"{what} of {samples} samples gives no full optimiser step with batch_size {self.batch_size} "
                f"× grad_accum {self.grad_accum} × {world_size} process(es): lower the batch size "
                f"(at most {max(samples // (self.grad_accum * world_size), 1)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (betas as a list)."""
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are a one-line :class:`TrainingError`."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainingError(f"train config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate for the 0-based optimiser update ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """A ``LambdaLR`` following :func:`lr_factor`; call ``.step()`` after each optimiser step."""
    warmup_steps = math.floor(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps))
