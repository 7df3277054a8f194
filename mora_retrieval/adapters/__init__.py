"""Adapters for open_clip CLIP: MoRA, its ablations, LoRA, DoRA, BitFit, full fine-tuning, and the
prompt baselines DCP and MMP (which cannot be merged).

>>> model = add_adapters(model, AdapterConfig(method="mora", r=4, targets=("q", "v"), layers=2))
>>> save_adapters(model, "run/adapter", arch="ViT-B-16")
>>> merged = merge_adapters(model)           # a plain open_clip model again
>>> export_checkpoint(merged, "merged.safetensors")
"""

from .config import PROJECTIONS, AdapterConfig, resolve_layers
from .methods import AdapterMethod, get_method, list_methods
from . import mora, lora  # registers MoRA and its ablations, then LoRA and DoRA (the listing order)
from .inject import add_adapters, adapter_config_of, base_state_dict, has_adapters, iter_projection_adapters, trainable_share
from .io import load_adapters, read_adapter_config, save_adapters
from .merge import (cached_adapted_weights, export_checkpoint, load_merged, merge_adapters, require_mergeable,
                    unmerge_adapters)
from .prompts import missing_cases, prompt_module  # registers DCP and MMP (after BitFit and full)

__all__ = [
    "PROJECTIONS", "AdapterConfig", "AdapterMethod", "add_adapters", "adapter_config_of", "base_state_dict",
    "cached_adapted_weights", "export_checkpoint", "get_method", "has_adapters", "iter_projection_adapters",
    "list_methods", "load_adapters", "merge_adapters", "missing_cases", "prompt_module", "read_adapter_config",
    "load_merged", "require_mergeable", "resolve_layers", "save_adapters", "trainable_share", "unmerge_adapters",
]
