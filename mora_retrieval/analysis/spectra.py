"""Gram spectra (paper Figure 4): the shared part's Gram matrices beside the pretrained weights.

For each MoRA layer slot, the shared factors ``S_v [r_s, d_v]`` and ``S_t [r_s, d_t]`` give the
Gram matrices ``G_v = S_v S_vᵀ`` and ``G_t = S_t S_tᵀ`` (``r_s × r_s``), whose eigenvalues
(descending) are normalised to sum to 1. Beside them, for each adapted projection of the slot's
vision and text blocks, the top ``r_s`` singular values of its pretrained weight ``W0``, each divided
by the sum of all ``d`` of them. Only methods with a shared part (MoRA and its ablations) have
spectra; the factors are read from ``adapter.safetensors`` under their public names
``shared.{slot}.vision`` and ``shared.{slot}.text``, independent of how adapters are built in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..adapters.inject import QKV, towers
from ..adapters.io import WEIGHTS_FILE as ADAPTER_WEIGHTS_FILE
from ..errors import AdapterError
from ..fileio import load_tensors
from .geometry import as_matrix

_SHARED_NAME = re.compile(r"^shared\.(?P<slot>[^.]+)\.(?P<tower>vision|text)$")


def read_shared_factors(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{slot: (S_v, S_t)}`` from ``adapter.safetensors`` (empty for methods without a shared part)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_tensors(path, "adapter weights", error=AdapterError).items():
        match = _SHARED_NAME.match(name)
        if match:
            found.setdefault(match["slot"], {})[match["tower"]] = tensor.detach().float()
    incomplete = sorted(slot for slot, pair in found.items() if len(pair) != 2)
    if incomplete:
        raise AdapterError(f"{path}: shared slot {incomplete[0]} lacks its vision or text factor")
    order = sorted(found, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    return {slot: (found[slot]["vision"], found[slot]["text"]) for slot in order}


def gram_spectrum(factor: Any) -> torch.Tensor:
    """Eigenvalues of ``S Sᵀ`` (descending), normalised to sum to 1; ``factor`` is ``S [r_s, d]``."""
    s = as_matrix(factor, "shared factor")
    eigenvalues = torch.linalg.eigvalsh(s @ s.T).flip(0).clamp_min(0.0)  # PSD: round-off below 0 is 0
    total = eigenvalues.sum()
    if total <= 0:
        raise ValueError("shared factor is zero: its Gram matrix has no spectrum")
    return eigenvalues / total


def singular_spectrum(weight: Any, top: int) -> torch.Tensor:
    """The ``top`` largest singular values of ``weight``, each divided by the sum of all of them."""
    values = torch.linalg.svdvals(as_matrix(weight, "weight"))
    total = values.sum()
    if total <= 0:
        raise ValueError("weight is zero: no singular spectrum")
    return values[:top] / total


def projection_weight(model: Any, tower: str, block: int, projection: str) -> torch.Tensor:
    """``W0`` of one attention projection of an open_clip model (``tower`` is ``visual`` or ``text``)."""
    attn = towers(model)[tower].resblocks[block].attn
    if projection == "out":
        return attn.out_proj.weight.detach()
    return attn.in_proj_weight.detach().chunk(3)[QKV.index(projection)]  # rows: q, k, v


@dataclass(frozen=True)
class SlotSpectra:
    """One slot's normalised spectra: the two Grams and the pretrained projections (``"{tower}.{proj}"``)."""

    slot: str
    vision_block: int | None
    text_block: int | None
    gram_vision: list[float]
    gram_text: list[float]
    pretrained: dict[str, list[float]]


def slot_spectra(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], original_model: Any, targets: Sequence[str],
                 slot_blocks: Sequence[Sequence[int | None]]) -> list[SlotSpectra]:
    """Spectra of every slot: Grams from ``factors``, the ``targets`` projections' pretrained weights from
    ``original_model``; ``slot_blocks[i]`` is slot ``i``'s ``[vision block, text block]`` (``adapter_config.json``)."""
    out, blocks = [], {str(i): pair for i, pair in enumerate(slot_blocks)}
    for slot, (s_vision, s_text) in factors.items():
        vision_block, text_block = blocks.get(slot, (None, None))
        top = int(s_vision.shape[0])
        pretrained: dict[str, list[float]] = {}
        for tower, block in (("visual", vision_block), ("text", text_block)):
            if block is None:
                continue
            for proj in targets:
                weight = projection_weight(original_model, tower, int(block), proj)
                pretrained[f"{tower}.{proj}"] = singular_spectrum(weight, top).tolist()
        out.append(SlotSpectra(slot, vision_block, text_block, gram_spectrum(s_vision).tolist(),
                               gram_spectrum(s_text).tolist(), pretrained))
    return out
