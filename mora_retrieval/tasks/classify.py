"""Missing-modality classification on CLIP features (METHOD.md §3): head, collate, engine task.

The classifier concatenates the image and the text embedding of the two CLIP towers
(``[image | text]``, ``2 × embed_dim``) and applies one linear layer initialised ``N(0, 0.02)``
(bias zero). Binary tasks use two logits with cross-entropy, multiclass cross-entropy,
multilabel one logit per class with binary cross-entropy.

Feature scaling (``features``): ``"normalized"`` (default) L2-normalises each tower's embedding
before concatenating, so both halves have the same scale whatever the backbone and neither
modality dominates the head; ``"raw"`` concatenates the unnormalised embeddings.

Tokenisation happens in the DataLoader's ``collate_fn`` (:class:`ClassifyCollate`, picklable, so
it runs in the worker processes), never in the training step. A missing modality reaches the
model exactly as the data protocol prepared it (``WithMissingModality``: the empty string, a
tensor of ones or the transformed white image); nothing is dropped or masked here. Each batch's
``missing`` codes go to the classifier, which hands them to a prompt-adapted model (``dcp``,
``mmp``: one prompt set per missing case), in training and in evaluation alike.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..adapters import missing_cases
from ..engine.module import TrainModule
from .metrics import MAIN_METRIC, TASKS, compute_metrics

FEATURE_MODES = ("normalized", "raw")
HEAD_INIT_STD = 0.02


def head_outputs(task: str, num_classes: int) -> int:
    """Logits per sample: 2 for ``binary``, else one per class."""
    if task not in TASKS:
        raise ValueError(f"unknown classification task {task!r}")
    return 2 if task == "binary" else int(num_classes)


class LinearHead(nn.Module):
    """``Linear(in_dim, out_dim)`` with weights ``N(0, std)`` and a zero bias."""

    def __init__(self, in_dim: int, out_dim: int, std: float = HEAD_INIT_STD) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.linear.weight, mean=0.0, std=std)
        nn.init.zeros_(self.linear.bias)

    @property
    def in_dim(self) -> int:
        return self.linear.in_features

    @property
    def out_dim(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class CLIPClassifier(nn.Module):
    """An open_clip model (plain, adapted or merged) plus a linear head on ``[image | text]`` features."""

    def __init__(self, clip: nn.Module, head: LinearHead, features: str = "normalized") -> None:
        super().__init__()
        if features not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {features!r} (expected normalized or raw)")
        self.clip = clip
        self.head = head
        self.feature_mode = features

    def features(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[image embedding | text embedding]`` of a batch, float32."""
        img = self.clip.encode_image(image).float()
        txt = self.clip.encode_text(tokens).float()
        if self.feature_mode == "normalized":
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return torch.cat([img, txt], dim=-1)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; ``missing`` (one code per sample: 0 complete, 1 text missing, 2 image missing) selects the
        prompts of a prompt-adapted model (``dcp``, ``mmp``) and is ignored by every other model."""
        with missing_cases(self.clip, missing):
            return self.head(self.features(image, tokens))


def classification_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (multiclass, binary) or binary cross-entropy with logits (multilabel)."""
    logits = logits.float()
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return F.cross_entropy(logits, targets.long())


class ClassifyCollate:
    """Batch items ``{image, text, label, index[, missing]}`` into tensors, tokenising the texts.

    Items that a dataset skipped (``None``, bad images) are dropped. Output keys: ``image``
    ``[B, 3, H, W]``, ``tokens`` ``[B, L]``, ``label``, ``index`` and ``missing`` (0 when the
    dataset has no missing-modality codes).
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item is not None]
        if not items:
            raise ValueError("every item of the batch was skipped")
        return {
            "image": torch.stack([item["image"] for item in items]),
            "tokens": self.tokenizer([item["text"] for item in items]),
            "label": torch.stack([torch.as_tensor(item["label"]) for item in items]),
            "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            "missing": torch.tensor([int(item.get("missing", 0)) for item in items], dtype=torch.long),
        }


def eval_loader(dataset: Dataset, collate: ClassifyCollate, batch_size: int, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """An ordered, complete (no drop_last) loader for evaluation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory)


@torch.no_grad()
def predict_logits(classifier: CLIPClassifier, loader: DataLoader, device: torch.device | str,
                   precision: str = "fp32", progress: Callable[[int], None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Run ``classifier`` over ``loader`` in eval mode: ``{"logits", "label", "index", "missing"}`` (CPU)."""
    from ..device import autocast

    device = torch.device(device)
    was_training = classifier.training
    classifier.eval()
    out: dict[str, list[torch.Tensor]] = {"logits": [], "label": [], "index": [], "missing": []}
    try:
        for batch in loader:
            with autocast(device, precision):
                logits = classifier(batch["image"].to(device, non_blocking=True),
                                    batch["tokens"].to(device, non_blocking=True), batch["missing"])
            out["logits"].append(logits.float().cpu())
            for key in ("label", "index", "missing"):
                out[key].append(batch[key])
            if progress is not None:
                progress(len(batch["index"]))
    finally:
        classifier.train(was_training)
    if not out["logits"]:
        raise ValueError("the evaluation set is empty")
    return {key: torch.cat(value) for key, value in out.items()}


class ClassifyModule(TrainModule):
    """The engine task: adapted CLIP + head, trained with the task's loss, validated on its metric.

    ``val_dataset`` yields the same items as the training set (with the validation scenario's
    missing modalities applied); ``evaluate`` returns every metric of
    :func:`~mora_retrieval.tasks.metrics.compute_metrics` plus ``loss``.
    """

    higher_is_better = True

    def __init__(self, classifier: CLIPClassifier, task: str, val_dataset: Dataset, collate: ClassifyCollate,
                 eval_batch_size: int = 256, num_workers: int = 0, precision: str = "auto") -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown classification task {task!r}")
        self.classifier = classifier
        self.task = task
        self.main_metric = MAIN_METRIC[task]
        self.val_dataset = val_dataset
        self.collate = collate
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.precision = precision

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.classifier(batch["image"], batch["tokens"], batch.get("missing"))
        return classification_loss(self.task, logits, batch["label"])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        return evaluate_classifier(self.classifier, self.task, self.val_dataset, self.collate, device,
                                   self.eval_batch_size, self.num_workers, self.precision)


def evaluate_classifier(classifier: CLIPClassifier, task: str, dataset: Dataset, collate: ClassifyCollate,
                        device: torch.device | str, batch_size: int = 256, num_workers: int = 0,
                        precision: str = "auto", progress: Callable[[int], None] | None = None
                        ) -> dict[str, float]:
    """Metrics (percent) and mean loss of ``classifier`` on ``dataset``."""
    from ..device import resolve_precision

    device = torch.device(device)
    loader = eval_loader(dataset, collate, batch_size, num_workers, pin_memory=device.type == "cuda")
    out = predict_logits(classifier, loader, device, resolve_precision(precision, device), progress)
    metrics = compute_metrics(task, out["logits"], out["label"])
    metrics["loss"] = float(classification_loss(task, out["logits"], out["label"]))
    return metrics
