"""Missing-modality classification with a linear head on CLIP features (docs/protocols.md §3)."""

from .predict import Predictor, predict_run
from .recipes import evaluate_run, run_grid, train_classifier
from .settings import ClassifySettings, build_settings

__all__ = ["ClassifySettings", "Predictor", "build_settings", "evaluate_run", "predict_run", "run_grid",
           "train_classifier"]
