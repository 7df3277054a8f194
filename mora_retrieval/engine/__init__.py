"""The training engine: one loop (AdamW, warm-up + cosine, bf16, DDP, resume) for every task.

Public API (imported lazily, so ``import mora_retrieval.engine`` stays light)::

    TrainConfig, TRAINING_FIELDS            # .config
    TrainModule                             # .module
    Trainer, TrainResult                    # .trainer
    TrainingInterrupted                     # .interrupt
    resume_or_fail, load_best               # .checkpoint
    seed_everything                         # .rng
    to_device, ResumableSampler             # .data
    lr_factor                               # .schedule
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import TRAINING_FIELDS, TrainConfig

_LAZY = {
    "TrainModule": "module",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "TrainingInterrupted": "interrupt",
    "resume_or_fail": "checkpoint",
    "load_best": "checkpoint",
    "seed_everything": "rng",
    "to_device": "data",
    "ResumableSampler": "data",
    "lr_factor": "schedule",
}

__all__ = ["TRAINING_FIELDS", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
