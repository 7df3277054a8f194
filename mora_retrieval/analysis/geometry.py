"""Embedding geometry (paper §4.4): inter-modal distance (Table 2), drift (Table 3), modality gap.

**Inter-modal distance.** For every category ``c`` with samples (a multilabel sample counts towards
each of its categories), the distance ``‖μ_v(c) − μ_t(c)‖₂`` and the angle ``∠(μ_v(c), μ_t(c))``
in degrees between the mean image and the mean text embedding of its samples, averaged over
categories (unweighted, as in the paper). On the **raw** embeddings: the paper's adapted rows exceed
2, the largest distance of two unit vectors; ``normalize=True`` (each embedding L2-normalised first)
compares with its original-CLIP row, which looks normalised.

**Drift.** For one tower, with the adapted embeddings ``a_i`` and the original model's embeddings
``o_i`` of the same inputs: the mean ``‖a_i − o_i‖₂`` (raw, as in the paper), the mean angle
``∠(a_i, o_i)`` in degrees, and the mean ``‖a_i/‖a_i‖ − o_i/‖o_i‖‖₂`` for comparison across models
of different embedding scale.

**Modality gap** (Liang et al., NeurIPS 2022): ``‖mean_i x̂_i − mean_j ŷ_j‖₂``, the distance between
the centroids of the L2-normalised image and text embeddings (not necessarily paired); 0 to 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def as_matrix(values: Any, name: str) -> torch.Tensor:
    """``values`` (tensor or array, ``[N, D]``) as a float64 CPU tensor; ValueError if empty or non-finite."""
    matrix = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] matrix, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return matrix


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise angle (degrees, in [0, 180]) between the rows of ``a`` and ``b``; ValueError for a zero row."""
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    if (norms == 0).any():
        raise ValueError("angle of a zero vector is undefined")
    cosine = ((a * b).sum(dim=-1) / norms).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosine))


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm (zero rows: ValueError)."""
    norms = matrix.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("cannot L2-normalise a zero embedding")
    return matrix / norms


@dataclass(frozen=True)
class InterModalDistance:
    """Averages over categories, plus the per-category values (categories without samples left out)."""

    l2: float
    angle: float
    categories: int
    per_category_l2: list[float]
    per_category_angle: list[float]
    per_category_count: list[int]
    category_ids: list[int]


def category_members(labels: Any) -> torch.Tensor:
    """A boolean membership matrix ``[N, C]`` from class indices ``[N]`` or multi-hot labels ``[N, C]``."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim == 2:
        return labels > 0.5
    if labels.ndim != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"labels: expected class indices [N] or multi-hot [N, C], got shape {tuple(labels.shape)}")
    if (labels < 0).any():
        raise ValueError("labels: class indices must be >= 0")
    return torch.nn.functional.one_hot(labels.long()).bool()  # C = the largest index + 1


def inter_modal_distance(image: Any, text: Any, labels: Any, normalize: bool = False) -> InterModalDistance:
    """Table 2's measure for paired ``image``/``text`` embeddings ``[N, D]`` with category ``labels``."""
    img, txt = as_matrix(image, "image embeddings"), as_matrix(text, "text embeddings")
    if img.shape != txt.shape:
        raise ValueError(f"image {tuple(img.shape)} and text {tuple(txt.shape)} embeddings must be paired")
    members = category_members(labels)
    if members.shape[0] != img.shape[0]:
        raise ValueError(f"{members.shape[0]} labels for {img.shape[0]} samples")
    if normalize:
        img, txt = unit_rows(img), unit_rows(txt)
    weights = members.to(torch.float64)
    counts = weights.sum(dim=0)
    present = counts > 0
    if not present.any():
        raise ValueError("labels: no sample belongs to any category")
    weights, counts = weights[:, present], counts[present]
    mean_img = weights.T @ img / counts[:, None]
    mean_txt = weights.T @ txt / counts[:, None]
    distances = (mean_img - mean_txt).norm(dim=-1)
    angles = angle_degrees(mean_img, mean_txt)
    return InterModalDistance(
        l2=float(distances.mean()),
        angle=float(angles.mean()),
        categories=int(present.sum()),
        per_category_l2=distances.tolist(),
        per_category_angle=angles.tolist(),
        per_category_count=[int(c) for c in counts.tolist()],
        category_ids=torch.nonzero(present).flatten().tolist(),
    )


@dataclass(frozen=True)
class Drift:
    """Means over samples of one tower."""

    l2: float
    angle: float
    l2_normalized: float
    samples: int


def embedding_drift(adapted: Any, original: Any) -> Drift:
    """Table 3's measure for one tower: ``adapted`` and ``original`` are ``[N, D]``, row ``i`` the same input."""
    new, old = as_matrix(adapted, "adapted embeddings"), as_matrix(original, "original embeddings")
    if new.shape != old.shape:
        raise ValueError(f"adapted {tuple(new.shape)} and original {tuple(old.shape)} embeddings must match")
    return Drift(
        l2=float((new - old).norm(dim=-1).mean()),
        angle=float(angle_degrees(new, old).mean()),
        l2_normalized=float((unit_rows(new) - unit_rows(old)).norm(dim=-1).mean()),
        samples=int(new.shape[0]),
    )


def modality_gap(image: Any, text: Any) -> float:
    """Distance between the centroids of the L2-normalised ``image`` ``[N, D]`` and ``text`` ``[M, D]`` embeddings."""
    img, txt = as_matrix(image, "image embeddings"), as_matrix(text, "text embeddings")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image ({img.shape[1]}) and text ({txt.shape[1]}) embeddings differ in width")
    return float((unit_rows(img).mean(dim=0) - unit_rows(txt).mean(dim=0)).norm())
