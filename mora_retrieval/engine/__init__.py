"""The training engine: one loop (AdamW, warm-up + cosine, bf16, DDP, resume) for every task.

A task implements :class:`TrainModule`; :class:`Trainer` trains it with a :class:`TrainConfig` into the
run folder described in :mod:`.checkpoint`.
"""

from .checkpoint import resume_or_fail
from .config import TRAINING_FIELDS, TrainConfig, lr_factor
from .module import TrainModule
from .rng import seed_everything
from .sampling import ResumableSampler, to_device
from .trainer import Trainer, TrainingInterrupted, TrainResult

__all__ = [
    "TRAINING_FIELDS", "ResumableSampler", "TrainConfig", "TrainModule", "TrainResult", "Trainer",
    "TrainingInterrupted", "lr_factor", "resume_or_fail", "seed_everything", "to_device",
]
