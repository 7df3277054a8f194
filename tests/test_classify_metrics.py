"""Classification metrics against independent plain-Python computations on fixed inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mora_retrieval.tasks.classify.metrics import (MAIN_METRIC, binary_auroc, compute_metrics, majority_baseline, multilabel_f1,
                                          top1_accuracy)


def test_top1_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0], [0.2, 0.1, 0.0]])
    labels = torch.tensor([1, 0, 0, 2, 0])
    hits = sum(int(max(range(3), key=lambda c: float(row[c])) == int(y)) for row, y in zip(logits, labels))
    assert hits == 3
    assert top1_accuracy(logits, labels) == pytest.approx(100.0 * hits / 5)


def _f1_reference(probs: list[list[float]], targets: list[list[int]], threshold: float = 0.5) -> tuple[float, float]:
    """Macro (empty classes count 0) and micro F1 from per-class tp/fp/fn counts (positive: p > threshold)."""
    classes = len(targets[0])
    per_class, tp_all, fp_all, fn_all = [], 0, 0, 0
    for c in range(classes):
        tp = sum(1 for p, t in zip(probs, targets) if p[c] > threshold and t[c] == 1)
        fp = sum(1 for p, t in zip(probs, targets) if p[c] > threshold and t[c] == 0)
        fn = sum(1 for p, t in zip(probs, targets) if p[c] <= threshold and t[c] == 1)
        per_class.append(0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    return 100 * sum(per_class) / classes, 100 * 2 * tp_all / (2 * tp_all + fp_all + fn_all)


def test_macro_f1_thresholds_sigmoid_at_half_and_counts_empty_classes_as_zero():
    # class 3 has no positive and is never predicted (F1 = 0/0 -> counted as 0);
    # class 2 has no positive but one false positive (F1 = 0 by definition).
    logits = torch.tensor([[2.0, -1.0, -3.0, -2.0],
                           [0.5, 1.0, -1.0, -4.0],
                           [-0.2, 0.3, 0.4, -1.0],
                           [1.5, -0.5, -2.0, -3.0],
                           [-1.0, -2.0, -1.0, -0.5]])
    targets = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float)
    probs = (1 / (1 + torch.exp(-logits))).tolist()
    macro_ref, micro_ref = _f1_reference(probs, targets.long().tolist())
    assert multilabel_f1(logits, targets) == pytest.approx(macro_ref, abs=1e-4)
    assert multilabel_f1(logits, targets, "micro") == pytest.approx(micro_ref, abs=1e-4)
    # exactly 0.5 is negative (strictly above the threshold is positive): logit 0 -> sigmoid 0.5
    edge = torch.tensor([[0.01, 5.0], [0.0, 5.0]])
    assert multilabel_f1(edge, torch.tensor([[1.0, 1.0], [0.0, 1.0]])) == pytest.approx(100.0)
    assert multilabel_f1(edge, torch.tensor([[1.0, 1.0], [1.0, 1.0]])) == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-4)
    # two classes: one perfect, one empty -> 50, not 100 (the empty class is not dropped)
    two = torch.tensor([[3.0, -3.0], [-3.0, -3.0]])
    assert multilabel_f1(two, torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(50.0)


def _auroc_pairwise(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return 100 * wins / (len(pos) * len(neg))


def test_auroc_of_softmax_class1_matches_brute_force_pairs_with_ties():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 2, generator=gen)
    logits[5] = logits[7]  # exact ties between a positive and a negative
    labels = (torch.rand(40, generator=gen) < 0.4).long()
    labels[5], labels[7] = 1, 0
    scores = torch.softmax(logits, dim=1)[:, 1].tolist()
    assert binary_auroc(logits, labels) == pytest.approx(_auroc_pairwise(scores, labels.tolist()), abs=1e-3)
    # the score is softmax p(class 1), so only the logit difference matters
    assert binary_auroc(logits + 7.0, labels) == pytest.approx(binary_auroc(logits, labels), abs=1e-4)


def test_auroc_is_nan_when_only_one_class_is_present():
    assert math.isnan(binary_auroc(torch.randn(6, 2), torch.ones(6, dtype=torch.long)))


def test_compute_metrics_main_metric_per_task_and_shape_check():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    out = compute_metrics("binary", logits, labels)
    assert set(out) == {"auroc", "accuracy"} and out["accuracy"] == pytest.approx(200 / 3)
    assert MAIN_METRIC == {"multiclass": "accuracy", "multilabel": "macro_f1", "binary": "auroc"}
    assert set(compute_metrics("multilabel", logits, labels[:, None].expand(3, 2).float())) == {"macro_f1", "micro_f1"}
    with pytest.raises(ValueError, match="logits must be"):
        compute_metrics("multiclass", logits[0], labels)


def test_majority_baseline():
    train = torch.tensor([2, 2, 1, 2, 0])
    test = torch.tensor([2, 0, 2, 1])
    assert majority_baseline("multiclass", train, test) == pytest.approx(50.0)
    assert majority_baseline("binary", torch.tensor([0, 1]), torch.tensor([1, 0])) == 50.0
    ml_train = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])  # class 0 frequent, class 1 not
    ml_test = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # predicts [1, 0] for everyone: class 0 F1 = 2/3, class 1 F1 = 0
    assert majority_baseline("multilabel", ml_train, ml_test) == pytest.approx(100 * (2 / 3) / 2, abs=1e-4)
