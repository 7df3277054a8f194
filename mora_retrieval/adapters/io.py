"""The adapter folder: ``adapter_config.json`` + ``adapter.safetensors`` (docs/protocols.md §7).

Tensor names are a public contract:

* ``shared.{slot}.vision`` ``[r_s, d_v]``, ``shared.{slot}.text`` ``[r_s, d_t]`` (and
  ``shared.{slot}.gram`` ``[r_s, r_s]`` for ``learned_gram``);
* ``{tower}.{block}.{proj}.A`` ``[r, d_in]``, ``.B`` ``[d_out, r]``, ``.m_specific``, ``.m_shared``
  ``[d_in]`` (MoRA), ``.A``/``.B`` (LoRA) and ``.m`` ``[d_out]`` (DoRA); ``tower`` is ``visual`` or ``text``,
  ``block`` the block index in that tower, ``proj`` one of ``q``, ``k``, ``v``, ``out``;
* ``bitfit`` and ``full`` store the trained base tensors as ``base.{open_clip state-dict name}``;
* prompt methods store their module's parameters as ``prompts.{name}`` (``prompts.py``): ``mmp``
  ``prompts.tokens.{tower}`` ``[3, N, P, d]`` (case, block, token, width); ``dcp``
  ``prompts.initial.{tower}`` ``[2, P/3, d]`` (modality present, missing), ``prompts.modal``
  ``[3, P/3, d_t]``, ``prompts.queries.{tower}`` ``[3, P/3, d]``, and the weights of its modules
  ``prompts.norms.{tower}.{block}.*``, ``prompts.generators.{tower}.{block}.{0,2}.*``,
  ``prompts.modal_proj.{tower}.{0,2}.*`` and ``prompts.query_attn.{tower}.*``.

The config records the backbone architecture, the tower shapes and a fingerprint of the base
weights, so loading onto another backbone fails with one clear line. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..model.backbone import weights_fingerprint
from ..errors import AdapterError
from ..fileio import load_tensors, read_json, save_tensors, write_json
from .config import AdapterConfig
from .inject import ROOT_ATTR, add_adapters, adapter_config_of, base_state_dict, iter_projection_adapters, tower_shapes
from .methods import get_method
from .prompts import prompt_module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "mora-retrieval-adapter"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their public names: the method's parts and the base tensors it trains."""
    method = get_method(adapter_config_of(model).method)
    tensors: dict[str, torch.Tensor] = {}
    if method.trains_base is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        tensors.update({f"base.{n}": t for n, t in base_state_dict(model).items() if n in trainable})
    for slot, module in getattr(model, ROOT_ATTR).slots.items():
        tensors.update({f"shared.{slot}.{part}": getattr(module, part) for part in method.shared})
    for prefix, adapter in iter_projection_adapters(model):
        tensors.update({f"{prefix}.{part}": getattr(adapter, part) for part in method.specific + method.magnitudes})
    if (prompts := prompt_module(model)) is not None:
        tensors.update({f"prompts.{name}": param for name, param in prompts.named_parameters()})
    return tensors


def save_adapters(model: nn.Module, folder: str | Path, arch: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder (atomic files). ``arch`` is the open_clip architecture name."""
    folder = Path(folder)
    config = adapter_config_of(model)
    root = getattr(model, ROOT_ATTR)
    convention = get_method(config.method).convention
    meta = {
        "format": FORMAT,
        "format_version": 1,
        "toolkit_version": __version__,
        "adapter": config.to_dict(),
        "alpha_resolved": config.resolved_alpha(),
        "arch": arch,
        "tower_shapes": tower_shapes(model),
        "base_fingerprint": root.base_fingerprint or weights_fingerprint(base_state_dict(model)),
        "slots": [list(pair) for pair in root.slot_blocks],
        **({convention[0]: convention[1]} if convention else {}),
        **(extra or {}),
    }
    save_tensors(folder / WEIGHTS_FILE, adapter_tensors(model), metadata={"format": FORMAT})
    write_json(folder / CONFIG_FILE, meta)
    return folder


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``adapter_config.json``; one-line errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_json(folder / CONFIG_FILE, "adapter config", error=AdapterError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "adapter" not in meta:
        raise AdapterError(f"{folder / CONFIG_FILE}: not a mora-retrieval adapter config")
    return meta


def load_adapters(
    model: nn.Module, folder: str | Path, arch: str | None = None, check_fingerprint: bool = True
) -> nn.Module:
    """Inject the adapters described in ``folder`` into a plain ``model`` and load their tensors; one-line
    :class:`AdapterError` when the folder belongs to another backbone or is damaged."""
    folder = Path(folder)
    meta = read_adapter_config(folder)
    if arch and meta.get("arch") and meta["arch"] != arch:
        raise AdapterError(f"{folder}: adapter made for {meta['arch']}, but the model is {arch}")
    if meta.get("tower_shapes") and meta["tower_shapes"] != (shapes := tower_shapes(model)):
        raise AdapterError(f"{folder}: adapter made for towers {meta['tower_shapes']} (width, depth), but the model has {shapes}")
    if check_fingerprint and meta.get("base_fingerprint"):
        if (found := weights_fingerprint(base_state_dict(model))) != meta["base_fingerprint"]:
            raise AdapterError(f"{folder}: adapter made for base weights {meta['base_fingerprint']}, but these weights are "
                               f"{found} (another checkpoint; pass the backbone it was trained on)")
    try:
        config = AdapterConfig.from_dict(meta["adapter"])
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE}: invalid adapter settings ({exc})") from None
    key, value, meaning = get_method(config.method).convention or (None, None, None)
    if key and meta.get(key) != value:
        raise AdapterError(f"{folder / CONFIG_FILE}: {config.method} adapter written by an older toolkit "
                           f"({key} is {meta.get(key)!r}, expected {value!r}): {meaning}; train it again")
    stored = load_tensors(folder / WEIGHTS_FILE, "adapter weights", error=AdapterError)
    bad = next((name for name, value in stored.items() if not torch.isfinite(value).all()), None)
    if bad is not None:
        raise AdapterError(f"{folder / WEIGHTS_FILE}: tensor {bad} holds NaN or inf values")
    add_adapters(model, config)
    expected = adapter_tensors(model)
    mismatch = {"missing": sorted(set(expected) - set(stored)), "unexpected": sorted(set(stored) - set(expected))}
    if any(mismatch.values()):
        detail = "; ".join(f"{kind} {len(names)}: {', '.join(names[:3])}" for kind, names in mismatch.items() if names)
        raise AdapterError(f"{folder / WEIGHTS_FILE}: tensors do not match the adapter config ({detail})")
    with torch.no_grad():
        for name, target in expected.items():
            if (shape := tuple(stored[name].shape)) != tuple(target.shape):
                raise AdapterError(f"{folder / WEIGHTS_FILE}: tensor {name} has shape {shape}, expected {tuple(target.shape)}")
            target.copy_(stored[name].to(target.dtype))
    return model
