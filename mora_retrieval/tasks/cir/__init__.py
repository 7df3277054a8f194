"""Composed image retrieval, CLIP4CIR with any adapter method, on CIRR."""

from .recipes import evaluate_cirr_run, train_cirr
from .settings import CIRSettings, build_settings

__all__ = ["CIRSettings", "build_settings", "evaluate_cirr_run", "train_cirr"]
