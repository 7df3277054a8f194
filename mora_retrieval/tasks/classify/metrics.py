"""Classification metrics of the three missing-modality benchmarks (docs/protocols.md §3), via torchmetrics.

Every value is a percentage (0–100), as in the paper's tables.

* ``multiclass`` (UPMC Food-101): **top-1 accuracy** of the arg-max logit.
* ``multilabel`` (MM-IMDb): **macro-F1** of ``sigmoid(logits) > 0.5`` (strictly above, as
  torchmetrics thresholds; a probability of exactly 0.5 is a negative), averaged over all
  classes. A class with no positive sample *and* no positive prediction has an undefined F1
  (0/0); it counts as **0** in the average (``zero_division=0``, also scikit-learn's default),
  so a test split that lacks a genre lowers the score rather than silently shrinking the
  average. ``micro_f1`` is reported beside it.
* ``binary`` (Hateful Memes): **AUROC** of the softmax probability of class 1 (ties count one
  half, as in the pairwise definition). AUROC is undefined when the labels hold a single
  class: the value is then ``nan`` (never chosen as a best epoch). ``accuracy`` (arg-max) is
  reported beside it.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc as _auroc, multiclass_accuracy, multilabel_f1_score

#: The tasks, and the metric each is selected and reported on.
MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "macro_f1", "binary": "auroc"}


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of rows whose arg-max logit is the label."""
    if len(labels) == 0:
        return math.nan
    value = multiclass_accuracy(logits.float(), labels.long(), num_classes=logits.shape[1], average="micro")
    return 100.0 * float(value)


def multilabel_f1(logits: torch.Tensor, targets: torch.Tensor, average: str = "macro", threshold: float = 0.5) -> float:
    """F1 of ``sigmoid(logits) > threshold`` in percent: per class, then averaged (``"macro"``), or
    over every (sample, class) decision pooled (``"micro"``)."""
    if len(targets) == 0:
        return math.nan
    probs = torch.sigmoid(logits.float())
    value = multilabel_f1_score(probs, targets.round().long(), num_labels=logits.shape[1], threshold=threshold,
                                average=average, zero_division=0)
    return 100.0 * float(value)


def binary_auroc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of ``softmax(logits)[:, 1]`` (two logits per row) against 0/1 labels, in percent."""
    labels = labels.long()
    if len(labels) == 0 or bool((labels == labels[0]).all()):
        return math.nan
    scores = torch.softmax(logits.float(), dim=1)[:, 1]
    return 100.0 * float(_auroc(scores, labels))


def compute_metrics(task: str, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """All metrics of ``task``; the key :data:`MAIN_METRIC` ``[task]`` is the one that selects and reports."""
    if task not in MAIN_METRIC:
        raise ValueError(f"unknown classification task {task!r} (expected one of {', '.join(MAIN_METRIC)})")
    if logits.ndim != 2 or len(logits) != len(targets):
        raise ValueError(f"logits must be [N, C] with one target per row (got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)})")
    logits, targets = logits.detach().cpu(), targets.detach().cpu()
    if task == "multiclass":
        return {"accuracy": top1_accuracy(logits, targets)}
    if task == "multilabel":
        return {"macro_f1": multilabel_f1(logits, targets), "micro_f1": multilabel_f1(logits, targets, "micro")}
    return {"auroc": binary_auroc(logits, targets), "accuracy": top1_accuracy(logits, targets)}


def majority_baseline(task: str, train_targets: torch.Tensor, test_targets: torch.Tensor) -> float:
    """The main metric of a constant predictor fitted on ``train_targets`` (a reference point).

    multiclass: accuracy of always predicting the most frequent training class; multilabel:
    macro-F1 of predicting every class whose training frequency is above one half; binary:
    AUROC of a constant score, i.e. 50.
    """
    if task == "binary":
        return 50.0
    n = len(test_targets)
    if task == "multiclass":
        counts = torch.bincount(train_targets.long())
        logits = torch.zeros(n, max(len(counts), int(test_targets.max()) + 1 if n else 1))
        logits[:, int(counts.argmax())] = 1.0
        return top1_accuracy(logits, test_targets)
    freq = train_targets.float().mean(0)
    logits = torch.where(freq > 0.5, 1.0, -1.0).expand(n, -1)
    return multilabel_f1(logits, test_targets)
