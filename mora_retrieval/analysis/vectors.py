"""Small vector helpers shared by the geometry measures: checked float64 matrices and angles."""

from __future__ import annotations

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
    """Row-wise angle (degrees, in [0, 180]) between the rows of ``a`` and ``b`` (same shape).

    A zero row has no direction: ValueError rather than a silent 90°.
    """
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
