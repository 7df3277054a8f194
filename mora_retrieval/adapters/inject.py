"""Attach adapters to open_clip's attention, freeze everything else, and walk them back.

Works on open_clip's attention as it is: ``nn.MultiheadAttention`` (a fused
``in_proj_weight`` whose row blocks are q, k, v; ``out_proj.weight`` is read directly and
``out_proj.forward`` is never called) and open_clip's own ``Attention`` (same parameter
names). Weights are replaced through ``torch.nn.utils.parametrize``, so the forward code of
open_clip is untouched and every access sees the adapted weight.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import AdapterError
from .base import AdaptedWeight, ProjectionAdapter
from .config import LOW_RANK_METHODS, MORA_METHODS, AdapterConfig, resolve_layers
from .lora import DoRAAdapter, LoRAAdapter
from .mora import MoRAAdapter, SharedSlot

ROOT_ATTR = "mora_adapter"
QKV = ("q", "k", "v")


class AdapterRoot(nn.Module):
    """Owns the adapter config and the shared slots; lives at ``model.mora_adapter``."""

    def __init__(self, config: AdapterConfig, slots: list[tuple[int | None, int | None]]):
        super().__init__()
        self.config = config
        self.slot_blocks = slots
        self.slots = nn.ModuleDict()
        self.base_fingerprint: str | None = None  # set for bitfit/full; others hash at save time


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The two transformers of an open_clip CLIP: ``{"visual": ..., "text": ...}``."""
    try:
        return {"visual": model.visual.transformer, "text": model.transformer}
    except AttributeError:
        raise AdapterError(
            f"{type(model).__name__} is not an open_clip CLIP with transformer towers "
            "(models with timm or Hugging Face towers are not supported)"
        ) from None


def _attention(block: nn.Module, where: str) -> nn.Module:
    attn = getattr(block, "attn", None)
    ok = attn is not None and hasattr(attn, "out_proj")
    ok = ok and (getattr(attn, "in_proj_weight", None) is not None or "in_proj_weight" in getattr(attn, "parametrizations", {}))
    if not ok:
        raise AdapterError(f"{where}: expected attention with a fused in_proj_weight and out_proj, found {type(attn).__name__}")
    return attn


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, ROOT_ATTR)


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    if not has_adapters(model):
        raise AdapterError("the model has no adapters (call add_adapters first)")
    return getattr(model, ROOT_ATTR).config


def _make_adapter(config: AdapterConfig, w0: torch.Tensor, slot: SharedSlot | None, tower: str) -> ProjectionAdapter:
    alpha = config.resolved_alpha()
    if config.method in MORA_METHODS:
        return MoRAAdapter(w0, config.method, config.r, alpha, slot, tower)
    if config.method == "lora":
        return LoRAAdapter(w0, config.r, alpha)
    return DoRAAdapter(w0, config.r, alpha)


def _attach(attn: nn.Module, config: AdapterConfig, slot: SharedSlot | None, tower: str, where: str) -> None:
    d = attn.out_proj.weight.shape[1]
    w_in = attn.in_proj_weight
    if w_in.shape != (3 * d, d) or attn.out_proj.weight.shape != (d, d):
        raise AdapterError(
            f"{where}: projections are not square (in_proj {tuple(w_in.shape)}, out_proj "
            f"{tuple(attn.out_proj.weight.shape)}); MoRA and LoRA here need d x d q/k/v/out"
        )
    qkv = {name: (i * d, (i + 1) * d) for i, name in enumerate(QKV)}
    in_adapters = {
        name: _make_adapter(config, w_in.detach()[start:stop], slot, tower)
        for name, (start, stop) in qkv.items()
        if name in config.targets
    }
    if in_adapters:
        parametrize.register_parametrization(attn, "in_proj_weight", AdaptedWeight(qkv, in_adapters))
    if "out" in config.targets:
        w_out = attn.out_proj.weight.detach()
        adapter = _make_adapter(config, w_out, slot, tower)
        parametrize.register_parametrization(attn.out_proj, "weight", AdaptedWeight({"out": (0, d)}, {"out": adapter}))


def freeze_for(model: nn.Module, method: str) -> None:
    """Set ``requires_grad``: only adapter tensors, or biases (bitfit), or both towers (full)."""
    for name, param in model.named_parameters():
        if method == "full":
            param.requires_grad_(not name.startswith("logit_"))
        elif method == "bitfit":
            param.requires_grad_(name.endswith("bias") and not name.startswith("logit_"))
        else:
            param.requires_grad_(False)
    if has_adapters(model):
        for _, adapter in iter_projection_adapters(model):
            adapter.requires_grad_(True)
        getattr(model, ROOT_ATTR).slots.requires_grad_(True)


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject adapters of ``config.method`` into both towers (in place) and freeze the rest.

    ``bitfit`` and ``full`` add no modules: they only choose what is trainable. Returns ``model``.
    """
    if has_adapters(model):
        raise AdapterError("the model already has adapters; merge or reload it before adding others")
    tower_modules = towers(model)
    depth_v = len(tower_modules["visual"].resblocks)
    depth_t = len(tower_modules["text"].resblocks)
    slots = resolve_layers(config, depth_v, depth_t)
    root = AdapterRoot(config, slots)
    if config.method in MORA_METHODS or config.method in LOW_RANK_METHODS:
        ref = tower_modules["visual"].resblocks[0].attn.out_proj.weight
        d_v = tower_modules["visual"].width if hasattr(tower_modules["visual"], "width") else ref.shape[1]
        d_t = tower_modules["text"].resblocks[0].attn.out_proj.weight.shape[1]
        for j, (vb, tb) in enumerate(slots):
            slot = None
            if config.uses_shared:
                slot = SharedSlot(config.method, config.r_shared, d_v, d_t, dtype=ref.dtype, device=ref.device)
                root.slots[str(j)] = slot
            for tower, block in (("visual", vb), ("text", tb)):
                if block is None:
                    continue
                where = f"{tower} block {block}"
                _attach(_attention(tower_modules[tower].resblocks[block], where), config, slot, tower, where)
    from ..model.backbone import weights_fingerprint
    from .io import base_state_dict

    if config.method in ("bitfit", "full"):
        # These methods train the base tensors themselves: remember what they started from.
        root.base_fingerprint = weights_fingerprint(base_state_dict(model))
    model.add_module(ROOT_ATTR, root)
    freeze_for(model, config.method)
    return model


def iter_projection_adapters(model: nn.Module) -> Iterator[tuple[str, ProjectionAdapter]]:
    """Yield ``("{tower}.{block}.{proj}", adapter)`` for every adapted projection, in a stable order."""
    for tower, module in towers(model).items():
        for index, block in enumerate(module.resblocks):
            attn = block.attn
            found: dict[str, ProjectionAdapter] = {}
            if parametrize.is_parametrized(attn, "in_proj_weight"):
                for p in attn.parametrizations["in_proj_weight"]:
                    found.update(p.projections.items())
            if parametrize.is_parametrized(attn.out_proj, "weight"):
                for p in attn.out_proj.parametrizations["weight"]:
                    found.update(p.projections.items())
            for proj in ("q", "k", "v", "out"):
                if proj in found:
                    yield f"{tower}.{index}.{proj}", found[proj]


def parametrized_weights(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Yield ``(module, tensor_name)`` for every weight carrying an adapter parametrization."""
    for module in towers(model).values():
        for block in module.resblocks:
            if parametrize.is_parametrized(block.attn, "in_proj_weight"):
                yield block.attn, "in_proj_weight"
            if parametrize.is_parametrized(block.attn.out_proj, "weight"):
                yield block.attn.out_proj, "weight"


def trainable_share(*modules: nn.Module) -> tuple[int, int, float]:
    """``(trainable, total, percent)`` over the distinct parameters of ``modules`` (e.g. model, head)."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for param in module.parameters():
            seen.setdefault(id(param), param)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total, 100.0 * trainable / max(total, 1)
