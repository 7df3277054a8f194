"""MoRA: modality-specific low-rank pairs plus a modality-shared part coupled through Gram matrices.

For a frozen square weight ``W0`` of modality ``m`` (METHOD.md §1):

* specific: ``ΔW_m = B A`` (``A ~ N(0, 1/r)``, ``B = 0``), per projection;
* shared, one ``SharedSlot`` per layer slot: ``S_v [r_s, d_v]``, ``S_t [r_s, d_t]`` ~ ``N(0, 1/r_s)``;
  ``G_m = S_m S_mᵀ``; vision gets ``ΔS_v = S_vᵀ G_t S_v`` and text ``ΔS_t = S_tᵀ G_v S_t``;
* ``D_x = (W0 + α Δ_x) / col(W0 + α Δ_x)``; ``W' = m_sp ⊙ D_sp + m_sh ⊙ D_sh`` with both
  magnitudes initialised to ``col(W0)`` (so ``W' ≈ 2 W0`` at initialisation, as in the paper).

Ablations: ``no_gram`` (``ΔS_m = S_mᵀ S_m``), ``learned_gram`` (a learned ``r_s × r_s`` matrix per
slot, initialised to the identity, replaces the other tower's Gram), ``no_shared`` (each tower
uses its own Gram: ``S_mᵀ G_m S_m``), ``no_specific`` (no ``D_sp`` term, no ``A``/``B``/``m_sp``),
``subtract_base`` (``W' = m_sp ⊙ D_sp + m_sh ⊙ D_sh − W0``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import ProjectionAdapter, column_norm

TOWERS = ("visual", "text")


class SharedSlot(nn.Module):
    """The modality-shared parameters of one layer slot (both towers)."""

    def __init__(self, method: str, r_shared: int, d_vision: int, d_text: int, dtype=None, device=None):
        super().__init__()
        self.method = method
        std = 1.0 / math.sqrt(r_shared)
        self.vision = nn.Parameter(torch.randn(r_shared, d_vision, dtype=dtype, device=device) * std)
        self.text = nn.Parameter(torch.randn(r_shared, d_text, dtype=dtype, device=device) * std)
        if method == "learned_gram":
            self.gram = nn.Parameter(torch.eye(r_shared, dtype=dtype, device=device))

    def factor(self, tower: str) -> torch.Tensor:
        return self.vision if tower == "visual" else self.text

    def coupling(self, tower: str) -> torch.Tensor | None:
        """The ``r_s × r_s`` matrix between ``S_mᵀ`` and ``S_m`` (None: no Gram, ``no_gram``)."""
        if self.method == "no_gram":
            return None
        if self.method == "learned_gram":
            return self.gram
        source = self.factor(tower) if self.method == "no_shared" else self.factor("text" if tower == "visual" else "visual")
        return source @ source.T

    def delta(self, tower: str) -> torch.Tensor:
        """``ΔS`` for ``tower``: a ``d × d`` matrix in that tower's width."""
        s = self.factor(tower)
        middle = self.coupling(tower)
        return s.T @ s if middle is None else s.T @ middle @ s


class MoRAAdapter(ProjectionAdapter):
    """One adapted projection of MoRA (or of one of its ablations)."""

    def __init__(self, w0: torch.Tensor, method: str, r: int, alpha: float, slot: SharedSlot, tower: str):
        d_out, d_in = w0.shape
        if d_out != d_in:
            raise ValueError(f"MoRA needs square projections, got {d_out}x{d_in}")
        super().__init__(d_out, d_in)
        self.method = method
        self.alpha = alpha
        self.tower = tower
        # The slot is owned by the model's adapter root; keep an unregistered reference so its
        # parameters are not duplicated in every projection's state.
        object.__setattr__(self, "_slot", slot)
        magnitude = column_norm(w0.detach()).clone()
        names = {"m_shared": "m_shared"}
        if method != "no_specific":
            self.A = nn.Parameter(torch.randn(r, d_in, dtype=w0.dtype, device=w0.device) / math.sqrt(r))
            self.B = nn.Parameter(torch.zeros(d_out, r, dtype=w0.dtype, device=w0.device))
            self.m_specific = nn.Parameter(magnitude.clone())
            names = {"A": "A", "B": "B", "m_specific": "m_specific", **names}
        self.m_shared = nn.Parameter(magnitude)
        self.tensor_names = names

    @property
    def slot(self) -> SharedSlot:
        return self._slot

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        shared = w0 + self.alpha * self.slot.delta(self.tower)
        out = self.m_shared * (shared / column_norm(shared))
        if self.method != "no_specific":
            specific = w0 + self.alpha * (self.B @ self.A)
            out = out + self.m_specific * (specific / column_norm(specific))
        if self.method == "subtract_base":
            out = out - w0
        return out
