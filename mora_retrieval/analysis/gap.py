"""The modality gap (Liang et al., NeurIPS 2022): the distance between the two modalities' centroids.

Every embedding is L2-normalised (the gap is defined on the unit sphere CLIP scores on); the gap is
``‖mean_i x̂_i − mean_j ŷ_j‖₂`` over all image embeddings ``x`` and all text embeddings ``y`` (the
two sets need not be paired or of the same size). 0 means the centroids coincide; 2 is the maximum.
"""

from __future__ import annotations

from typing import Any

from .vectors import as_matrix, unit_rows


def modality_gap(image: Any, text: Any) -> float:
    """Distance between the centroids of the L2-normalised ``image`` ``[N, D]`` and ``text`` ``[M, D]`` embeddings."""
    img, txt = as_matrix(image, "image embeddings"), as_matrix(text, "text embeddings")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image ({img.shape[1]}) and text ({txt.shape[1]}) embeddings differ in width")
    return float((unit_rows(img).mean(dim=0) - unit_rows(txt).mean(dim=0)).norm())
