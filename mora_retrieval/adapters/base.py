"""What the projection adapters share: an adapter is an ``nn.Module`` per adapted square projection
whose ``forward(W0)`` is its pure weight function ``W'``. The weight is attached to open_clip's
attention with ``torch.nn.utils.parametrize`` (``inject.py``), so the model's own forward code runs
unchanged and merging is a single evaluation of the weight function.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def clamped_norm(weight: torch.Tensor, dim: int, eps: float = 1e-5) -> torch.Tensor:
    """L2 norms of a weight along ``dim`` (0: one per input column, MoRA; 1: one per output row, DoRA), >= ``eps``."""
    return weight.norm(dim=dim).clamp_min(eps)


def low_rank_pair(w0: torch.Tensor, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``A [r, d_in] ~ N(0, 1/r)`` and ``B [d_out, r] = 0`` beside ``w0`` (``B A = 0`` at initialisation)."""
    d_out, d_in = w0.shape
    a = torch.randn(r, d_in, dtype=w0.dtype, device=w0.device) / math.sqrt(r)
    return nn.Parameter(a), nn.Parameter(torch.zeros(d_out, r, dtype=w0.dtype, device=w0.device))


class AdaptedWeight(nn.Module):
    """Parametrization of one stored weight whose row blocks are projections (``in_proj_weight``: q, k, v;
    ``out_proj.weight``: one block); blocks without an adapter pass through unchanged."""

    def __init__(self, row_blocks: dict[str, tuple[int, int]], adapters: dict[str, nn.Module]):
        super().__init__()
        self.row_blocks = dict(row_blocks)
        self.projections = nn.ModuleDict(adapters)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        pieces = [self.projections[name](weight[a:b]).to(weight.dtype) if name in self.projections else weight[a:b]
                  for name, (a, b) in self.row_blocks.items()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
