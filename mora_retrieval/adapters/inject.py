"""Attach adapters to open_clip's attention, freeze everything else, and walk them back.

Works on ``nn.MultiheadAttention`` and open_clip's own ``Attention`` as they are: a fused
``in_proj_weight`` whose row blocks are q, k, v, and an ``out_proj.weight`` read directly
(``out_proj.forward`` is never called).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..model.backbone import weights_fingerprint
from ..errors import AdapterError
from .base import AdaptedWeight
from .config import AdapterConfig, resolve_layers
from .methods import AdapterMethod, get_method, register

ROOT_ATTR = "mora_adapter"
QKV = ("q", "k", "v")

# BitFit and full fine-tuning add no modules: they only choose which base tensors train.
register(AdapterMethod("bitfit", trains_base=lambda name: name.endswith("bias") and not name.startswith("logit_")))
register(AdapterMethod("full", trains_base=lambda name: not name.startswith("logit_")))


class AdapterRoot(nn.Module):
    """Owns the adapter config, the shared slots and, for prompt methods, the prompts (``.prompts``);
    lives at ``model.mora_adapter``."""

    def __init__(self, config: AdapterConfig, slots: list[tuple[int | None, int | None]]):
        super().__init__()
        self.config = config
        self.slot_blocks = slots
        self.slots = nn.ModuleDict()
        self.base_fingerprint: str | None = None  # set when the method trains base tensors; others hash at save time


def tower_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{"visual": [width, depth], "text": [width, depth]}``."""
    return {tower: [int(m.resblocks[0].attn.out_proj.weight.shape[1]), len(m.resblocks)]
            for tower, m in towers(model).items()}


def towers(model: nn.Module) -> dict[str, nn.Module]:
    """The two transformers of an open_clip CLIP: ``{"visual": ..., "text": ...}``."""
    try:
        return {"visual": model.visual.transformer, "text": model.transformer}
    except AttributeError:
        raise AdapterError(
            f"{type(model).__name__} is not an open_clip CLIP with transformer towers "
            "(models with timm or Hugging Face towers are not supported)"
        ) from None


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, ROOT_ATTR)


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    if not has_adapters(model):
        raise AdapterError("the model has no adapters (call add_adapters first)")
    return getattr(model, ROOT_ATTR).config


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


def _checked_attention(block: nn.Module, where: str) -> nn.Module:
    """``block.attn``, if adapters can take it: a fused, square ``in_proj_weight`` and ``out_proj``."""
    attn = getattr(block, "attn", None)
    if not hasattr(attn, "out_proj") or getattr(attn, "in_proj_weight", None) is None:
        raise AdapterError(f"{where}: expected attention with a fused in_proj_weight and out_proj, "
                           f"found {type(attn).__name__}")
    d = attn.out_proj.weight.shape[1]
    if attn.in_proj_weight.shape != (3 * d, d) or attn.out_proj.weight.shape != (d, d):
        raise AdapterError(
            f"{where}: projections are not square (in_proj {tuple(attn.in_proj_weight.shape)}, out_proj "
            f"{tuple(attn.out_proj.weight.shape)}); MoRA and LoRA here need d x d q/k/v/out"
        )
    return attn


def _attach(attn: nn.Module, config: AdapterConfig, slot: nn.Module | None, tower: str) -> None:
    make = get_method(config.method).make_projection
    d = attn.out_proj.weight.shape[1]
    w_in = attn.in_proj_weight
    qkv = {name: (i * d, (i + 1) * d) for i, name in enumerate(QKV)}
    in_adapters = {name: make(w_in.detach()[a:b], config, slot, tower) for name, (a, b) in qkv.items() if name in config.targets}
    if in_adapters:
        parametrize.register_parametrization(attn, "in_proj_weight", AdaptedWeight(qkv, in_adapters))
    if "out" in config.targets:
        adapter = make(attn.out_proj.weight.detach(), config, slot, tower)
        parametrize.register_parametrization(attn.out_proj, "weight", AdaptedWeight({"out": (0, d)}, {"out": adapter}))


def freeze_for(model: nn.Module, method: AdapterMethod) -> None:
    """Set ``requires_grad`` of an adapted model: the adapter tensors (the projections' and those of
    the adapter root: shared slots, prompts) and the base tensors ``method.trains_base`` names."""
    for name, param in model.named_parameters():
        param.requires_grad_(method.trains_base is not None and method.trains_base(name))
    for _, adapter in iter_projection_adapters(model):
        adapter.requires_grad_(True)
    getattr(model, ROOT_ATTR).requires_grad_(True)


def add_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Inject adapters of ``config.method`` into both towers (in place) and freeze the rest; returns ``model``.
    ``bitfit`` and ``full`` add no modules; a prompt method adds ``model.mora_adapter.prompts``."""
    method = get_method(config.method)
    if has_adapters(model):
        raise AdapterError("the model already has adapters; merge or reload it before adding others")
    tower_modules = towers(model)
    shapes = tower_shapes(model)
    widths, depths = ({tower: shape[i] for tower, shape in shapes.items()} for i in (0, 1))
    slots = resolve_layers(config, depths["visual"], depths["text"])
    root = AdapterRoot(config, slots)
    ref = tower_modules["visual"].resblocks[0].attn.out_proj.weight
    like = {"dtype": ref.dtype, "device": ref.device}
    if method.make_projection is not None:
        # Every block is checked before the first is touched: a refused model is left as it was.
        attentions = [{tower: _checked_attention(tower_modules[tower].resblocks[block], f"{tower} block {block}")
                       for tower, block in (("visual", vb), ("text", tb)) if block is not None} for vb, tb in slots]
        for j, slot_attentions in enumerate(attentions):
            slot = None
            if method.make_slot is not None:
                slot = root.slots[str(j)] = method.make_slot(config, widths["visual"], widths["text"], **like)
            for tower, attn in slot_attentions.items():
                _attach(attn, config, slot, tower)
    if method.make_prompts is not None:
        prompts = method.make_prompts(config, widths, depths, **like)
        root.add_module("prompts", prompts)
        prompts.attach(tower_modules)
    if method.trains_base is not None:
        # These methods train the base tensors themselves: remember what they started from.
        root.base_fingerprint = weights_fingerprint(base_state_dict(model))
    model.add_module(ROOT_ATTR, root)
    freeze_for(model, method)
    return model


def iter_projection_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``("{tower}.{block}.{proj}", adapter)`` for every adapted projection, in a stable order."""
    for tower, module in towers(model).items():
        for index, block in enumerate(module.resblocks):
            for owner, attr in ((block.attn, "in_proj_weight"), (block.attn.out_proj, "weight")):
                for weight in owner.parametrizations[attr] if parametrize.is_parametrized(owner, attr) else ():
                    for proj, adapter in weight.projections.items():
                        yield f"{tower}.{index}.{proj}", adapter


def parametrized_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(state-dict name, module, tensor name)`` for every parametrized weight of ``model``."""
    for name, module in model.named_modules():
        for attr in module.parametrizations if parametrize.is_parametrized(module) else ():
            yield f"{name}.{attr}", module, attr


def trainable_share(*modules: nn.Module) -> tuple[int, int, float]:
    """``(trainable, total, percent)`` over the distinct parameters of ``modules`` (e.g. model, head)."""
    params = {id(p): p for module in modules for p in module.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total, 100.0 * trainable / max(total, 1)
