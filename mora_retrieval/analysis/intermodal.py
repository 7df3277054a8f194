"""Inter-modal distance (paper Table 2): how far apart the two modalities sit, per category.

For every category ``c`` with samples, take the mean image embedding ``μ_v(c)`` and the mean text
embedding ``μ_t(c)`` of its samples; the category's distance is ``‖μ_v(c) − μ_t(c)‖₂`` and its
angle ``∠(μ_v(c), μ_t(c))`` in degrees. Both are averaged over categories (unweighted, as in the
paper). A multilabel sample counts towards every category it carries.

The primary figures are on the **raw** embeddings (``encode_image``/``encode_text`` outputs): the
paper's adapted rows exceed 2, the largest distance of two unit vectors. ``normalize=True`` (each
embedding L2-normalised before the means) compares with its original-CLIP row, which looks
normalised (README, "The embedding analysis").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .vectors import angle_degrees, as_matrix, unit_rows


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


def category_members(labels: Any, num_categories: int | None = None) -> torch.Tensor:
    """A boolean membership matrix ``[N, C]`` from class indices ``[N]`` or multi-hot labels ``[N, C]``."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim == 2:
        return labels > 0.5
    if labels.ndim != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"labels: expected class indices [N] or multi-hot [N, C], got shape {tuple(labels.shape)}")
    labels = labels.long()
    if (labels < 0).any():
        raise ValueError("labels: class indices must be >= 0")
    count = int(labels.max()) + 1 if num_categories is None else int(num_categories)
    if int(labels.max()) >= count:
        raise ValueError(f"labels: class index {int(labels.max())} >= number of categories {count}")
    return torch.nn.functional.one_hot(labels, count).bool()


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
