"""The classification head on CLIP features, and its file.

:class:`CLIPClassifier` applies one :class:`LinearHead` (docs/protocols.md §3) to the image and the text
embedding concatenated (``[image | text]``, ``2 × embed_dim``). ``"normalized"`` features (the default) are
L2-normalised per tower first, so both halves have the same scale whatever the backbone; ``"raw"`` ones are not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.prompts import missing_cases
from ..errors import TrainingError
from ..fileio import load_tensors_and_metadata, save_tensors

FEATURE_MODES = ("normalized", "raw")
HEAD_INIT_STD = 0.02
HEAD_FORMAT = "mora-retrieval-classifier-head"


class LinearHead(nn.Module):
    """``Linear(in_dim, out_dim)`` with weights ``N(0, std)`` and a zero bias."""

    def __init__(self, in_dim: int, out_dim: int, std: float = HEAD_INIT_STD) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.linear.weight, mean=0.0, std=std)
        nn.init.zeros_(self.linear.bias)

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


def save_head(head: LinearHead, path: str | os.PathLike, task: str, class_names: list[str], features: str) -> Path:
    """Write the linear head as safetensors (``weight``, ``bias``) with the task, the feature mode and
    the class names in the metadata."""
    path = Path(path)
    save_tensors(path, {"weight": head.linear.weight, "bias": head.linear.bias},
                 metadata={"format": HEAD_FORMAT, "task": task, "features": features,
                           "class_names": json.dumps(list(class_names))})
    return path


def load_head(path: str | os.PathLike) -> tuple[LinearHead, dict[str, Any]]:
    """``(LinearHead, {"task", "features", "class_names"})`` from :func:`save_head`'s file (nothing is
    unpickled)."""
    path = Path(path)
    tensors, meta = load_tensors_and_metadata(path, "classifier head", error=TrainingError)
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if meta.get("format") != HEAD_FORMAT or weight is None or bias is None or weight.ndim != 2 \
            or tuple(bias.shape) != (weight.shape[0],):
        raise TrainingError(f"{path}: not a classifier head (expected {HEAD_FORMAT} with weight [C, D] and bias [C])")
    head = LinearHead(weight.shape[1], weight.shape[0])
    head.load_state_dict({"linear.weight": weight, "linear.bias": bias})
    return head, {"task": meta.get("task"), "features": meta.get("features", "normalized"),
                  "class_names": json.loads(meta.get("class_names", "[]"))}
