"""Load a finished classification run (merged weights + head) and predict one image and/or text.

A prompt-adapted run (``dcp``, ``mmp``) is used unmerged, with the prompts of the input's missing case.
An absent input is handled exactly like the protocol's missing modality (at least one is required).

Scores: ``multiclass`` softmax probabilities (the top ``k`` are listed, the first is the
prediction); ``multilabel`` sigmoid probabilities (predicted: every class above 0.5, as in the macro-F1 metric);
``binary`` softmax probabilities of both classes (predicted: the larger one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...adapters import has_adapters
from ...data.images import load_image
from ...data.missing import COMPLETE, IMAGE_MISSING, TEXT_MISSING
from ...device import resolve_device
from ...errors import DataError, TrainingError
from ...model.backbone import embed_dim, image_size_of
from ...model.heads import CLIPClassifier, load_head
from ...runs import HEAD_FILE
from .settings import ClassifySettings, open_run, read_run_config


@dataclass
class Prediction:
    """Labels with scores, best first; ``predicted`` are the labels the task's rule selects."""

    task: str
    scores: list[tuple[str, float]]
    predicted: list[str]
    missing: str  # "none" | "text" | "image"
    inputs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "predicted": self.predicted, "missing": self.missing, "inputs": self.inputs,
                "scores": [{"label": label, "score": score} for label, score in self.scores]}


class Predictor:
    """A finished run's classifier (eval mode, on ``device``) with what feeds it; ``evaluated_on``:
    ``merged``, or ``unmerged`` for a prompt method (:meth:`~mora_retrieval.runs.FinishedRun.load_model`)."""

    def __init__(self, run_dir: str | os.PathLike, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        run = open_run(run_dir)
        record = read_run_config(run)
        self.settings = ClassifySettings.from_run(run, record)
        head_path = run.require(HEAD_FILE)
        head, meta = load_head(head_path)
        backbone = run.load_model()
        dim = embed_dim(backbone.model)
        if head.linear.in_features != 2 * dim:
            raise TrainingError(f"{head_path}: head takes {head.linear.in_features} features but {run.arch} gives "
                                f"{2 * dim}")
        self.classifier = CLIPClassifier(backbone.model, head, meta.get("features") or self.settings.features)
        self.classifier.to(self.device).eval()
        self.preprocess, self.tokenizer = backbone.preprocess, backbone.tokenizer
        self.task: str = record["dataset_task"]  # multiclass | multilabel | binary
        self.class_names: list[str] = list(record["class_names"])
        self.evaluated_on = "unmerged" if has_adapters(backbone.model) else "merged"

    def encode_inputs(self, image: str | os.PathLike | Any | None, text: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(image batch [1, 3, H, W], tokens [1, L], missing code)`` as the model receives them."""
        if image is None and text is None:
            raise DataError("nothing to classify: give an image, a text, or both")
        if image is None:  # the protocol's missing image: ones, or the transformed white image
            size = image_size_of(self.classifier.clip)
            white = self.preprocess(Image.new("RGB", (size, size), (255, 255, 255)))
            pixels, code = (torch.ones_like(white) if self.settings.missing_image == "ones" else white), IMAGE_MISSING
        else:
            pil = image if isinstance(image, Image.Image) else load_image(image)
            pixels, code = self.preprocess(pil.convert("RGB")), COMPLETE
        if text is None:
            text, code = "", TEXT_MISSING
        return pixels.unsqueeze(0), self.tokenizer([text]), code

    @torch.no_grad()
    def predict(self, image: str | os.PathLike | Any | None = None, text: str | None = None,
                top_k: int = 5) -> Prediction:
        """Classify one sample; ``top_k`` limits the listed multiclass scores."""
        pixels, tokens, code = self.encode_inputs(image, text)
        logits = self.classifier(pixels.to(self.device), tokens.to(self.device),
                                 torch.tensor([code])).float().cpu()[0]
        probs = torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=0)
        scores = [(self.class_names[i], float(probs[i])) for i in torch.argsort(probs, descending=True).tolist()]
        predicted = [name for name, p in scores if p > 0.5] if self.task == "multilabel" else [scores[0][0]]
        if self.task == "multiclass":
            scores = scores[:max(1, top_k)]
        inputs = {"image": None if image is None else str(image), "text": text if code != TEXT_MISSING else None}
        return Prediction(self.task, scores, predicted, {0: "none", 1: "text", 2: "image"}[code], inputs)


def predict_run(run_dir: str | os.PathLike, image: str | os.PathLike | None = None, text: str | None = None,
                top_k: int = 5, device: str = "auto") -> Prediction:
    """One-shot :class:`Predictor` call."""
    if image is not None and not Path(image).is_file():
        raise DataError(f"{image}: image file not found")
    return Predictor(run_dir, device).predict(image, text, top_k)
