"""LoRA and DoRA projection adapters (baselines of the paper's Table 4).

* LoRA: ``W' = W0 + (α/r)·B A``, ``A ~ N(0, 1/r)``, ``B = 0``.
* DoRA, as the DoRA authors and PEFT (``use_dora``) run it: ``V = W0 + (α/r)·B A`` and
  ``W' = (m / row(V)) ⊙ V`` with one magnitude per output row, ``m`` initialised to ``row(W0)``.
  ``row(V)`` is detached from the gradient (DoRA paper §4.3). MoRA's magnitudes are per input
  column instead (docs/protocols.md §1, ``mora.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import clamped_norm, low_rank_pair
from .methods import AdapterMethod, register


class LoRAAdapter(nn.Module):
    def __init__(self, w0: torch.Tensor, r: int, alpha: float):
        super().__init__()
        self.scale = alpha / r
        self.A, self.B = low_rank_pair(w0, r)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + self.scale * (self.B @ self.A)


class DoRAAdapter(LoRAAdapter):
    def __init__(self, w0: torch.Tensor, r: int, alpha: float):
        super().__init__(w0, r, alpha)
        self.m = nn.Parameter(clamped_norm(w0.detach(), dim=1).clone())

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        adapted = super().forward(w0)
        return (self.m / clamped_norm(adapted, dim=1).detach())[:, None] * adapted


register(AdapterMethod("lora", specific=("A", "B"),
                       make_projection=lambda w0, config, slot, tower: LoRAAdapter(w0, config.r, config.resolved_alpha())))
register(AdapterMethod("dora", specific=("A", "B"), magnitudes=("m",),
                       make_projection=lambda w0, config, slot, tower: DoRAAdapter(w0, config.r, config.resolved_alpha()),
                       convention=("dora_magnitude", "row", "DoRA now keeps one magnitude per output row as PEFT "
                                   "does, not one per input column")))
