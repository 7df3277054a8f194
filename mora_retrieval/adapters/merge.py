"""Fold adapters into plain weights and export open_clip checkpoints.

``merge_adapters`` evaluates every weight function once and writes the result into the base
weight (``parametrize.remove_parametrizations(..., leave_parametrized=True)``), then removes
the adapter root: what is left is the open_clip model class of the original architecture,
with no adapter modules or parametrizations, hence no inference overhead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import AdapterError
from ..fileio import atomic_write, save_tensors
from .inject import ROOT_ATTR, has_adapters, parametrized_weights


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights, in place; returns the now plain model.

    A model without adapters (or trained with ``bitfit``/``full``) is returned as it is, with
    its adapter root removed. All parameters end up trainable again, like a fresh open_clip model.
    """
    for module, name in list(parametrized_weights(model)):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if has_adapters(model):
        delattr(model, ROOT_ATTR)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@contextlib.contextmanager
def cached_adapted_weights() -> Iterator[None]:
    """Evaluate each adapted weight once per block of code (inference without merging)."""
    with parametrize.cached():
        yield


def export_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write a plain open_clip state dict that ``open_clip.create_model(arch, pretrained=path)`` loads.

    ``.safetensors`` (recommended) or ``.pt``/``.bin`` (a dict of tensors, loadable with
    ``torch.load(weights_only=True)``). The model must be merged first.
    """
    path = Path(path)
    if has_adapters(model) or any(True for _ in parametrized_weights(model)):
        raise AdapterError(f"{path}: merge the adapters before exporting a checkpoint (merge_adapters(model))")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_tensors(path, state, metadata={"format": "open_clip"})
    elif path.suffix in (".pt", ".pth", ".bin"):
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
    else:
        raise AdapterError(f"{path}: checkpoint must end in .safetensors, .pt, .pth or .bin")
    return path
