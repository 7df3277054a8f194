"""The projection interface: one ``ProjectionAdapter`` per adapted square projection.

An adapter owns its trainable tensors and a pure weight function ``W' = weight(W0)`` (which
adapter a method builds is its registered rule, ``methods.py``). The weight is attached to
open_clip's attention with ``torch.nn.utils.parametrize`` (``inject.py``), so the model's own
forward code runs unchanged and merging is a single evaluation of the weight function.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def column_norm(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """L2 norm of each input column of a ``[d_out, d_in]`` weight, clamped below at ``eps`` (MoRA)."""
    return weight.norm(dim=0).clamp_min(eps)


def row_norm(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """L2 norm of each output row of a ``[d_out, d_in]`` weight, clamped below at ``eps`` (DoRA)."""
    return weight.norm(dim=1).clamp_min(eps)


def low_rank_pair(w0: torch.Tensor, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``A [r, d_in] ~ N(0, 1/r)`` and ``B [d_out, r] = 0`` beside ``w0`` (``B A = 0`` at initialisation)."""
    d_out, d_in = w0.shape
    a = torch.randn(r, d_in, dtype=w0.dtype, device=w0.device) / math.sqrt(r)
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, r, dtype=w0.dtype, device=w0.device))


class ProjectionAdapter(nn.Module):
    """Base class: maps the frozen weight ``W0`` of one projection to its adapted weight."""

    def forward(self, w0: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class AdaptedWeight(nn.Module):
    """Parametrization of one stored weight holding one or more projections as row blocks.

    ``nn.MultiheadAttention.in_proj_weight`` stacks q, k, v as rows ``[0:d]``, ``[d:2d]``,
    ``[2d:3d]``; an ``out_proj.weight`` is a single block. Blocks without an adapter pass
    through unchanged.
    """

    def __init__(self, row_blocks: dict[str, tuple[int, int]], adapters: dict[str, ProjectionAdapter]):
        super().__init__()
        self.row_blocks = dict(row_blocks)
        self.projections = nn.ModuleDict(adapters)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pieces = [self.projections[name](weight[a:b]).to(weight.dtype) if name in self.projections else weight[a:b]
                  for name, (a, b) in self.row_blocks.items()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
