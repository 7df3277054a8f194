"""Mixed precision: ``"auto"`` is bf16 autocast on CUDA and fp32 on CPU.

bf16 needs no loss scaling, so there is no GradScaler. ``evaluate`` is called without
autocast; a task that wants bf16 validation can use :func:`autocast_context` itself.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` on CUDA, ``"fp32"`` elsewhere; explicit values are kept."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` in bf16 for ``"bf16"``, a no-op context for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
