"""Fold adapters into plain weights and export open_clip checkpoints.

``merge_adapters`` evaluates every weight function once and writes the result into the base
weight (the parametrization is dropped and the module gets its own class back), then removes
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
def _fold(module: nn.Module, name: str) -> None:
    """Replace a parametrized tensor by its current value without touching shared classes.

    ``parametrize.remove_parametrizations`` deletes the property from the module's generated
    class, which ``copy.deepcopy`` shares between copies: merging a copy would break the
    original. Restoring the module's class instead leaves every other copy intact.
    """
    parametrizations = module.parametrizations
    if len(parametrizations) > 1:  # not produced by add_adapters; use torch's own removal
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        return
    original = parametrizations[name].original
    value = getattr(module, name).detach().to(original.dtype).clone()
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    module.register_parameter(name, nn.Parameter(value, requires_grad=original.requires_grad))


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights, in place; returns the now plain model.

    A model without adapters (or trained with ``bitfit``/``full``) is returned as it is, with
    its adapter root removed. All parameters end up trainable again, like a fresh open_clip model.
    """
    for module, name in list(parametrized_weights(model)):
        _fold(module, name)
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


def merge_adapter_folder(
    adapter_dir: str | Path, out: str | Path, arch: str | None = None, pretrained: str | None = None
) -> dict:
    """Load a backbone, apply the adapter folder, merge, and export the plain checkpoint.

    ``arch`` defaults to the architecture recorded in the adapter config. Returns a summary
    (arch, pretrained, method, fingerprint of the merged weights, output path).
    """
    from ..model.backbone import load_backbone, weights_fingerprint
    from .io import load_adapters, read_adapter_config

    meta = read_adapter_config(adapter_dir)
    arch = arch or meta.get("arch")
    if not arch:
        raise AdapterError(f"{adapter_dir}: the adapter config names no architecture; pass --model")
    model = load_backbone(arch, pretrained).model
    load_adapters(model, adapter_dir, arch=arch)
    merged = merge_adapters(model)
    path = export_checkpoint(merged, out)
    return {
        "arch": arch,
        "pretrained": pretrained,
        "method": meta["adapter"]["method"],
        "fingerprint": weights_fingerprint(merged),
        "checkpoint": str(path),
    }
