"""Fold adapters into plain weights (and back) and export open_clip checkpoints.

``merge_adapters`` evaluates every weight function once, writes the result into the base weight
and removes the adapter root: what is left is the plain open_clip model, with no inference
overhead. Like PEFT's safe merge it checks the merged weights for NaN and inf first; with
``reversible=True`` it keeps what ``unmerge_adapters`` needs to restore the adapted model (like
PEFT's ``merge_adapter`` / ``unmerge_adapter``).
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import AdapterError
from ..fileio import atomic_write, make_dirs, save_tensors, write_json
from ..model.backbone import (CHECKPOINT_SUFFIXES, LOCAL_DIR_CONFIG, LOCAL_DIR_WEIGHTS, load_backbone,
                              register_model_configs, weights_fingerprint)
from .inject import ROOT_ATTR, freeze_for, has_adapters, parametrized_weights
from .io import load_adapters, read_adapter_config
from .methods import get_method

UNMERGE_ATTR = "_mora_unmerge"  # (adapter root, folded weights): a plain attribute, outside the state dict


@torch.no_grad()
def _fold(module: nn.Module, name: str, value: torch.Tensor) -> tuple | None:
    """Replace a parametrized tensor by ``value``; returns what undoes it. ``parametrize.remove_parametrizations``
    deletes the property from the module's generated class, which ``copy.deepcopy`` shares between copies
    (merging a copy would break the original); restoring the module's class leaves every other copy intact."""
    parametrizations = module.parametrizations
    if len(parametrizations) > 1:  # not produced by add_adapters; use torch's own removal
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        return None
    original, parametrized_class = parametrizations[name].original, type(module)
    module.__class__ = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    module.register_parameter(name, nn.Parameter(value.to(original.dtype).clone(), requires_grad=original.requires_grad))
    return module, name, parametrized_class, parametrizations


def require_mergeable(method: str, where: str | Path | None = None) -> None:
    """One-line :class:`AdapterError` when ``method`` cannot be folded into the weights."""
    if not get_method(method).mergeable:
        head = f"{where}: " if where is not None else ""
        raise AdapterError(f"{head}{method} adapters cannot be merged: their prompts are extra tokens in every forward "
                           f"pass, not a weight change (use the adapter folder unmerged)")


@torch.no_grad()
def merge_adapters(model: nn.Module, reversible: bool = False) -> nn.Module:
    """Fold the adapters into the base weights, in place; returns the now plain model, every parameter trainable
    again (a model without adapters, or trained with ``bitfit``/``full``, only loses its adapter root). Safe: a
    merged weight with NaN or inf, or a prompt method, raises :class:`AdapterError` and leaves the model unmerged."""
    root = getattr(model, ROOT_ATTR, None)
    if root is not None:
        require_mergeable(root.config.method)
    merged = [(qualified, module, name, getattr(module, name).detach())
              for qualified, module, name in parametrized_weights(model)]
    checked = [(qualified, value) for qualified, _, _, value in merged]
    if root is not None:  # with bitfit/full, the trained base tensors are the merged weights
        checked += [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".parametrizations." not in n]
    bad = next((qualified for qualified, value in checked if not torch.isfinite(value).all()), None)
    if bad is not None:
        raise AdapterError(f"merging gives NaN or inf in {bad}: the adapter is broken (the model is left unmerged)")
    folded = [undo for undo in (_fold(module, name, value) for _, module, name, value in merged) if undo]
    if root is not None:
        if reversible:
            model.__dict__[UNMERGE_ATTR] = (root, folded)
        delattr(model, ROOT_ATTR)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def load_merged(model: nn.Module, adapter_dir: str | Path, arch: str | None = None,
                check_fingerprint: bool = True) -> nn.Module:
    """The adapter folder loaded onto ``model`` and merged into it, for inference (eval mode); a prompt
    method's adapter (``dcp``, ``mmp``), which cannot be merged, stays loaded unmerged."""
    model = load_adapters(model, adapter_dir, arch=arch, check_fingerprint=check_fingerprint)
    if get_method(getattr(model, ROOT_ATTR).config.method).mergeable:
        model = merge_adapters(model)
    return model.eval()


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Restore, in place, the adapted model that ``merge_adapters(model, reversible=True)`` merged (changes
    made to the merged weights are lost); returns ``model``."""
    if UNMERGE_ATTR not in model.__dict__:
        raise AdapterError("the model holds no reversibly merged adapters (merge_adapters(model, reversible=True))")
    root, folded = model.__dict__.pop(UNMERGE_ATTR)
    for module, name, parametrized_class, parametrizations in folded:
        module._modules["parametrizations"] = parametrizations.to(module._parameters.pop(name).device)
        module.__class__ = parametrized_class
    model.add_module(ROOT_ATTR, root.to(next(model.parameters()).device))
    freeze_for(model, get_method(root.config.method))
    return model


#: ``with cached_adapted_weights():`` evaluates each adapted weight once per block of code (inference
#: without merging): torch's own ``parametrize.cached``.
cached_adapted_weights = parametrize.cached


def export_checkpoint(model: nn.Module, path: str | Path, arch: str | None = None) -> Path:
    """Write a plain open_clip checkpoint of a merged ``model``: a ``.safetensors`` file (recommended) or a
    ``.pt``/``.pth``/``.bin`` dict of tensors (``torch.load(weights_only=True)``), which load with
    ``open_clip.create_model(arch, pretrained=path)``; any other ``path`` becomes a self-describing folder
    (``open_clip_config.json``, with ``arch``'s config and the model's preprocessing, beside
    ``open_clip_model.safetensors``) that ``open_clip.create_model("local-dir:" + path)`` loads by itself."""
    path = Path(path)
    if has_adapters(model) or any(parametrized_weights(model)):
        raise AdapterError(f"{path}: merge the adapters before exporting a checkpoint (merge_adapters(model))")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_tensors(path, state, metadata={"format": "open_clip"})
    elif path.suffix in CHECKPOINT_SUFFIXES:  # .pt, .pth, .bin
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
    else:
        if arch is None:
            raise AdapterError(f"{path}: a checkpoint folder needs the architecture name "
                               "(or end the path in .safetensors)")
        register_model_configs()
        if (config := open_clip.get_model_config(arch)) is None:
            raise AdapterError(f"{path}: unknown architecture {arch!r}")
        preprocess = getattr(model.visual, "preprocess_cfg", None) or {}  # JSON writes its tuples as lists
        make_dirs(path, "checkpoint folder")
        save_tensors(path / LOCAL_DIR_WEIGHTS, state, metadata={"format": "open_clip"})
        write_json(path / LOCAL_DIR_CONFIG, {"model_cfg": config, "preprocess_cfg": preprocess})
    return path


def _recorded_weights(adapter_dir: Path, meta: dict) -> str:
    """The base weights recorded in an adapter config, or a one-line error naming what is expected."""
    recorded = meta.get("pretrained", "missing")
    fingerprint = meta.get("base_fingerprint", "?")
    if recorded == "missing":
        raise AdapterError(f"{adapter_dir}: the adapter config records no base weights; pass --pretrained with the "
                           f"weights it was trained on (fingerprint {fingerprint})")
    if recorded in (None, "none"):
        raise AdapterError(f"{adapter_dir}: the adapter was trained on random weights, which cannot be rebuilt; "
                           f"export them once and train with --pretrained FILE")
    if Path(recorded).suffix not in CHECKPOINT_SUFFIXES and "/" not in recorded:
        return recorded  # an open_clip tag
    for candidate in (Path(recorded), adapter_dir.parent / recorded):
        if candidate.is_file():
            return str(candidate)
    raise AdapterError(f"{adapter_dir}: the recorded base weights {recorded} are not found; pass --pretrained with "
                       f"that file (fingerprint {fingerprint})")


def merge_adapter_folder(
    adapter_dir: str | Path, out: str | Path, arch: str | None = None, pretrained: str | None = None
) -> dict:
    """Load a backbone, apply the adapter folder, merge, and export the plain checkpoint to ``out``
    (:func:`export_checkpoint`); returns a summary. ``arch`` and ``pretrained`` default to those the adapter
    config records (a relative file is looked up from the working directory, then in the adapter's parent)."""
    meta = read_adapter_config(adapter_dir)
    require_mergeable(str(meta["adapter"].get("method", "mora")), adapter_dir)
    arch = arch or meta.get("arch")
    if not arch:
        raise AdapterError(f"{adapter_dir}: the adapter config names no architecture; pass --model")
    if pretrained is None:
        pretrained = _recorded_weights(Path(adapter_dir), meta)
    model = load_backbone(arch, pretrained).model
    load_adapters(model, adapter_dir, arch=arch)
    path = export_checkpoint(merge_adapters(model), out, arch=arch)
    return {"arch": arch, "pretrained": pretrained, "method": meta["adapter"]["method"],
            "fingerprint": weights_fingerprint(model), "checkpoint": str(path)}
