"""Linear warm-up then cosine decay to 0, stepped once per optimiser step.

With ``T`` total optimiser steps and ``W = floor(warmup_ratio · T)`` warm-up steps, the update
number ``s`` (0-based) uses

- ``lr · (s + 1) / W`` for ``s < W`` (the first update already moves; the W-th reaches ``lr``),
- ``lr · ½ (1 + cos(π (s − W) / (T − W)))`` for ``W ≤ s < T``, which reaches 0 at ``s = T``.
"""

from __future__ import annotations

import functools
import math

import torch


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
