"""LoRA and DoRA projection adapters (baselines of the paper's Table 4).

* LoRA: ``W' = W0 + (α/r)·B A``, ``A ~ N(0, 1/r)``, ``B = 0``.
* DoRA, as the DoRA authors and PEFT (``use_dora``) run it: ``V = W0 + (α/r)·B A`` and
  ``W' = (m / row(V)) ⊙ V`` with one magnitude per output row, ``m`` initialised to ``row(W0)``.
  ``row(V)`` is detached from the gradient (DoRA paper §4.3). MoRA's magnitudes are per input
  column instead (METHOD.md §1, ``mora.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ProjectionAdapter, row_norm


class LoRAAdapter(ProjectionAdapter):
    tensor_names = {"A": "A", "B": "B"}

    def __init__(self, w0: torch.Tensor, r: int, alpha: float):
        d_out, d_in = w0.shape
        super().__init__(d_out, d_in)
        self.scale = alpha / r
        self.A = nn.Parameter(torch.randn(r, d_in, dtype=w0.dtype, device=w0.device) / math.sqrt(r))
        self.B = nn.Parameter(torch.zeros(d_out, r, dtype=w0.dtype, device=w0.device))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.delta()


class DoRAAdapter(LoRAAdapter):
    tensor_names = {"A": "A", "B": "B", "m": "m"}

    def __init__(self, w0: torch.Tensor, r: int, alpha: float):
        super().__init__(w0, r, alpha)
        self.m = nn.Parameter(row_norm(w0.detach()).clone())

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        adapted = w0 + self.delta()
        return (self.m / row_norm(adapted).detach())[:, None] * adapted
