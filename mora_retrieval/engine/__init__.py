"""The training engine: one loop (AdamW, warm-up + cosine, bf16, DDP, resume) for every task.

Modules: :mod:`.config` (``TrainConfig``), :mod:`.module` (``TrainModule``, what a task
implements), :mod:`.trainer` (``Trainer``), :mod:`.checkpoint` (the engine's run folder and the
resume check), :mod:`.sampling` (the resumable sampler), :mod:`.schedule`, :mod:`.rng`,
:mod:`.distributed`, :mod:`.interrupt`, :mod:`.curves` (console output: :mod:`mora_retrieval.progress`).
"""

from .checkpoint import resume_or_fail
from .config import TRAINING_FIELDS, TrainConfig
from .interrupt import TrainingInterrupted
from .module import TrainModule
from .rng import seed_everything
from .sampling import ResumableSampler, to_device
from .schedule import lr_factor
from .trainer import Trainer, TrainResult

__all__ = [
    "TRAINING_FIELDS", "ResumableSampler", "TrainConfig", "TrainModule", "TrainResult", "Trainer",
    "TrainingInterrupted", "lr_factor", "resume_or_fail", "seed_everything", "to_device",
]
