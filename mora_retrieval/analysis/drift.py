"""Modality-specific drift (paper Table 3): how far adaptation moved each sample's embedding.

For one tower, with the adapted embeddings ``a_i`` and the original model's embeddings ``o_i`` of
the same inputs: the mean ``‖a_i − o_i‖₂`` (raw embeddings, as in the paper: its figures exceed
the unit-vector range), the mean angle ``∠(a_i, o_i)`` in degrees (the same for raw and
normalised embeddings), and the mean ``‖a_i/‖a_i‖ − o_i/‖o_i‖‖₂`` for comparison across models of
different embedding scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .vectors import angle_degrees, as_matrix, unit_rows


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
