"""MoRA: modality-specific low-rank pairs plus a modality-shared part coupled through Gram matrices.

For a frozen square weight ``W0`` of modality ``m`` (docs/protocols.md §1):

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

from .base import clamped_norm, low_rank_pair
from .methods import AdapterMethod, register


class SharedSlot(nn.Module):
    """The modality-shared parameters of one layer slot (both towers). ``coupling`` is the matrix between
    ``S_mᵀ`` and ``S_m``: ``"other"`` (the other tower's Gram, MoRA), ``"own"`` (``no_shared``), ``"learned"``
    or ``"none"`` (``no_gram``)."""

    def __init__(self, coupling: str, r_shared: int, d_vision: int, d_text: int, dtype=None, device=None):
        super().__init__()
        self.coupling_kind = coupling
        std = 1.0 / math.sqrt(r_shared)
        self.vision = nn.Parameter(torch.randn(r_shared, d_vision, dtype=dtype, device=device) * std)
        self.text = nn.Parameter(torch.randn(r_shared, d_text, dtype=dtype, device=device) * std)
        if coupling == "learned":
            self.gram = nn.Parameter(torch.eye(r_shared, dtype=dtype, device=device))

    def delta(self, tower: str) -> torch.Tensor:
        """``ΔS`` for ``tower``: a ``d × d`` matrix in that tower's width."""
        own, other = (self.vision, self.text) if tower == "visual" else (self.text, self.vision)
        if self.coupling_kind == "none":
            return own.T @ own
        if self.coupling_kind == "learned":
            return own.T @ self.gram @ own
        source = own if self.coupling_kind == "own" else other
        return own.T @ (source @ source.T) @ own


class MoRAAdapter(nn.Module):
    """One adapted projection of MoRA (or of one of its ablations); ``w0`` is square (``inject.py`` checks)."""

    def __init__(self, w0: torch.Tensor, r: int, alpha: float, slot: SharedSlot, tower: str,
                 specific: bool = True, subtract_base: bool = False):
        super().__init__()
        self.alpha, self.tower, self.specific, self.subtract_base = alpha, tower, specific, subtract_base
        # The slot is owned by the model's adapter root; keep an unregistered reference so its
        # parameters are not duplicated in every projection's state.
        object.__setattr__(self, "_slot", slot)
        magnitude = clamped_norm(w0.detach(), dim=0).clone()
        if specific:
            self.A, self.B = low_rank_pair(w0, r)
            self.m_specific = nn.Parameter(magnitude.clone())
        self.m_shared = nn.Parameter(magnitude)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        shared = w0 + self.alpha * self._slot.delta(self.tower)
        out = self.m_shared * (shared / clamped_norm(shared, dim=0))
        if self.specific:
            specific = w0 + self.alpha * (self.B @ self.A)
            out = out + self.m_specific * (specific / clamped_norm(specific, dim=0))
        return out - w0 if self.subtract_base else out


def _register(name: str, coupling: str = "other", specific: bool = True, subtract_base: bool = False) -> None:
    register(AdapterMethod(
        name, default_alpha=0.01, shared=("vision", "text") + (("gram",) if coupling == "learned" else ()),
        specific=("A", "B") if specific else (), magnitudes=("m_specific", "m_shared") if specific else ("m_shared",),
        make_projection=lambda w0, c, slot, tower: MoRAAdapter(w0, c.r, c.resolved_alpha(), slot, tower, specific, subtract_base),
        make_slot=lambda c, d_vision, d_text, **kw: SharedSlot(coupling, c.r_shared, d_vision, d_text, **kw)))


_register("mora")
_register("no_gram", coupling="none")
_register("learned_gram", coupling="learned")
_register("no_shared", coupling="own")
_register("no_specific", specific=False)
_register("subtract_base", subtract_base=True)
