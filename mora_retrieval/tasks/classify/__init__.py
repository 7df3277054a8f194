"""Missing-modality classification with a linear head on CLIP features (docs/protocols.md §3).

:mod:`.settings` (per-dataset defaults, the settings layers, data under a scenario),
:mod:`.model` (loss, collate, the engine task, evaluation), :mod:`.metrics`, :mod:`.recipes`
(``train_classifier``, ``evaluate_run``, ``run_grid``), :mod:`.predict` (a finished run's
classifier, single predictions).
"""

from .predict import Predictor, predict_run
from .recipes import evaluate_run, run_grid, train_classifier
from .settings import ClassifySettings, build_settings

__all__ = ["ClassifySettings", "Predictor", "build_settings", "evaluate_run", "predict_run", "run_grid",
           "train_classifier"]
