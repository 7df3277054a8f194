"""The adapter folder: ``adapter_config.json`` + ``adapter.safetensors`` (METHOD.md §7).

Tensor names are a public contract:

* ``shared.{slot}.vision`` ``[r_s, d_v]``, ``shared.{slot}.text`` ``[r_s, d_t]`` (and
  ``shared.{slot}.gram`` ``[r_s, r_s]`` for ``learned_gram``);
* ``{tower}.{block}.{proj}.A`` ``[r, d_in]``, ``.B`` ``[d_out, r]``, ``.m_specific``, ``.m_shared``
  ``[d_in]`` (MoRA), ``.A``/``.B`` (LoRA) and ``.m`` ``[d_out]`` (DoRA); ``tower`` is ``visual`` or ``text``,
  ``block`` the block index in that tower, ``proj`` one of ``q``, ``k``, ``v``, ``out``;
* ``bitfit`` and ``full`` store the trained base tensors as ``base.{open_clip state-dict name}``.

The config records the backbone architecture, the tower shapes and a fingerprint of the base
weights, so loading onto another backbone fails with one clear line. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..backbone import weights_fingerprint
from ..errors import AdapterError
from ..fileio import load_tensors, read_json, save_tensors, write_json
from .config import AdapterConfig
from .inject import ROOT_ATTR, add_adapters, adapter_config_of, iter_projection_adapters, towers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "mora-retrieval-adapter"
#: DoRA keeps one magnitude per output row (as PEFT); early files had one per input column.
DORA_MAGNITUDE = {"dora_magnitude": "row"}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own tensors under their plain open_clip names (adapter tensors left out)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(f"{ROOT_ATTR}."):
            continue
        if ".parametrizations." in name:
            head, _, tail = name.partition(".parametrizations.")
            attr, _, rest = tail.partition(".")
            if rest != "original":
                continue
            name = f"{head}.{attr}"
        out[name] = tensor
    return out


def tower_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{"visual": [width, depth], "text": [width, depth]}``."""
    shapes = {}
    for tower, module in towers(model).items():
        width = module.resblocks[0].attn.out_proj.weight.shape[1]
        shapes[tower] = [int(width), len(module.resblocks)]
    return shapes


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their public names."""
    config = adapter_config_of(model)
    root = getattr(model, ROOT_ATTR)
    tensors: dict[str, torch.Tensor] = {}
    if config.method in ("bitfit", "full"):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for name, tensor in base_state_dict(model).items():
            if name in trainable:
                tensors[f"base.{name}"] = tensor
        return tensors
    for slot, module in root.slots.items():
        tensors[f"shared.{slot}.vision"] = module.vision
        tensors[f"shared.{slot}.text"] = module.text
        if hasattr(module, "gram"):
            tensors[f"shared.{slot}.gram"] = module.gram
    for prefix, adapter in iter_projection_adapters(model):
        for suffix, tensor in adapter.named_adapter_tensors().items():
            tensors[f"{prefix}.{suffix}"] = tensor
    return tensors


def save_adapters(model: nn.Module, folder: str | Path, arch: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder (atomic files). ``arch`` is the open_clip architecture name."""
    folder = Path(folder)
    config = adapter_config_of(model)
    root = getattr(model, ROOT_ATTR)
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
        **(DORA_MAGNITUDE if config.method == "dora" else {}),
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
    """Inject the adapters described in ``folder`` into a plain ``model`` and load their tensors.

    Fails with :class:`AdapterError` (one line) when the folder belongs to another backbone
    (architecture, tower shapes or base-weight fingerprint), when tensors are missing, extra or
    of the wrong shape, or when a file is corrupted.
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    if arch and meta.get("arch") and meta["arch"] != arch:
        raise AdapterError(f"{folder}: adapter made for {meta['arch']}, but the model is {arch}")
    shapes = tower_shapes(model)
    if meta.get("tower_shapes") and meta["tower_shapes"] != shapes:
        raise AdapterError(
            f"{folder}: adapter made for towers {meta['tower_shapes']} (width, depth), but the model has {shapes}"
        )
    if check_fingerprint and meta.get("base_fingerprint"):
        found = weights_fingerprint(base_state_dict(model))
        if found != meta["base_fingerprint"]:
            raise AdapterError(
                f"{folder}: adapter made for base weights {meta['base_fingerprint']}, but these weights are "
                f"{found} (another checkpoint; pass the backbone it was trained on)"
            )
    try:
        config = AdapterConfig.from_dict(meta["adapter"])
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE}: invalid adapter settings ({exc})") from None
    if config.method == "dora" and meta.get("dora_magnitude") != DORA_MAGNITUDE["dora_magnitude"]:
        raise AdapterError(
            f"{folder / CONFIG_FILE}: DoRA adapter with one magnitude per input column (an older toolkit); "
            "DoRA now keeps one per output row, as PEFT does: retrain it"
        )
    stored = load_tensors(folder / WEIGHTS_FILE, "adapter weights", error=AdapterError)
    add_adapters(model, config)
    expected = adapter_tensors(model)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        detail = "; ".join(
            part for part in (
                f"missing {len(missing)}: {', '.join(missing[:3])}" if missing else "",
                f"unexpected {len(extra)}: {', '.join(extra[:3])}" if extra else "",
            ) if part
        )
        raise AdapterError(f"{folder / WEIGHTS_FILE}: tensors do not match the adapter config ({detail})")
    with torch.no_grad():
        for name, target in expected.items():
            value = stored[name]
            if tuple(value.shape) != tuple(target.shape):
                raise AdapterError(
                    f"{folder / WEIGHTS_FILE}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))
    return model
