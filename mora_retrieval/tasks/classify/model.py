"""Missing-modality classification (docs/protocols.md §3): loss, collate, engine task, evaluation.

A missing modality reaches the model exactly as ``WithMissingModality`` prepared it; nothing is
dropped or masked here. Each batch's ``missing`` codes go to the classifier, which hands them to a
prompt-adapted model (``dcp``, ``mmp``: one prompt set per missing case), in training and evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ...data.collate import CaptionCollate
from ...engine.module import TrainModule
from ...model.encode import collect, ordered_loader
from ...model.heads import CLIPClassifier
from ...progress import ProgressBar
from .metrics import MAIN_METRIC, compute_metrics


def classification_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (multiclass, binary) or binary cross-entropy with logits (multilabel)."""
    logits = logits.float()
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return F.cross_entropy(logits, targets.long())


class ClassifyCollate(CaptionCollate):
    """Batch items ``{image, text, label, index[, missing]}``, tokenising the texts (``missing`` defaults to 0).

    Items that a dataset skipped (``None``, bad images) are dropped; a batch of only such items is ``None``.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        super().__init__(tokenizer, field="text")

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        return super().__call__([{"missing": 0, **item} for item in items if item is not None])


def predict_logits(classifier: CLIPClassifier, loader: DataLoader, device: torch.device | str,
                   precision: str = "fp32", progress: Callable[[int], None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Run ``classifier`` over ``loader`` in eval mode: ``{"logits", "label", "index", "missing"}`` (CPU)."""
    device = torch.device(device)
    was_training = classifier.training
    classifier.eval()
    try:
        out = collect(loader, lambda batch: {
            "logits": classifier(batch["image"].to(device, non_blocking=True),
                                 batch["tokens"].to(device, non_blocking=True), batch["missing"]).float().cpu(),
            **{key: batch[key] for key in ("label", "index", "missing")}}, device, precision, progress)
    finally:
        classifier.train(was_training)
    if not out:
        raise ValueError("the evaluation set is empty")
    return out


class ClassifyModule(TrainModule):
    """The engine task: adapted CLIP + head, trained with the task's loss, validated on its main metric."""

    higher_is_better = True

    def __init__(self, classifier: CLIPClassifier, task: str, val_dataset: Dataset, collate: ClassifyCollate,
                 eval_batch_size: int = 256) -> None:
        super().__init__()
        self.classifier = classifier
        self.task = task
        self.main_metric = MAIN_METRIC[task]
        self.val_dataset = val_dataset
        self.collate = collate
        self.eval_batch_size = eval_batch_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(batch["image"], batch["tokens"], batch.get("missing"))
        return classification_loss(self.task, logits, batch["label"])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        return evaluate_classifier(self.classifier, self.task, self.val_dataset, self.collate, device,
                                   self.eval_batch_size, self.num_workers, self.precision)


def evaluate_classifier(classifier: CLIPClassifier, task: str, dataset: Dataset, collate: ClassifyCollate,
                        device: torch.device | str, batch_size: int = 256, num_workers: int = 0,
                        precision: str = "fp32", console: Any = None, description: str = "evaluation"
                        ) -> dict[str, float]:
    """Metrics (percent) and mean loss of ``classifier`` on ``dataset``; a progress bar on ``console``."""
    device = torch.device(device)
    loader = ordered_loader(dataset, batch_size, device, num_workers, collate)
    with ProgressBar(console, description, "samples/s") as bar:
        bar.start(len(dataset))
        out = predict_logits(classifier, loader, device, precision, bar.advance)
    metrics = compute_metrics(task, out["logits"], out["label"])
    metrics["loss"] = float(classification_loss(task, out["logits"], out["label"]))
    return metrics
