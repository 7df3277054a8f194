"""Composed image retrieval, CLIP4CIR with any adapter method, on CIRR.

:mod:`.settings` (defaults per method, the settings layers), :mod:`.stages` (stage 1: encoder
adaptation, stage 2: the Combiner; CIRR validation), :mod:`.metrics` (Recall@K,
Recall_subset@K, the server's submission files), :mod:`.recipes` (``train_cirr``,
``evaluate_cirr_run``).
"""

from .recipes import evaluate_cirr_run, train_cirr
from .settings import CIRSettings, build_settings

__all__ = ["CIRSettings", "build_settings", "evaluate_cirr_run", "train_cirr"]
