"""Adapters for open_clip CLIP: MoRA, its ablations, LoRA, DoRA, BitFit and full fine-tuning.

>>> model = add_adapters(model, AdapterConfig(method="mora", r=4, targets=("q", "v"), layers=2))
>>> save_adapters(model, "run/adapter", arch="ViT-B-16")
>>> merged = merge_adapters(model)           # a plain open_clip model again
>>> export_checkpoint(merged, "merged.safetensors")
"""

from .config import METHODS, PROJECTIONS, AdapterConfig, resolve_layers
from .inject import add_adapters, adapter_config_of, has_adapters, iter_projection_adapters, trainable_share
from .io import base_state_dict, load_adapters, read_adapter_config, save_adapters
from .merge import cached_adapted_weights, export_checkpoint, merge_adapters

__all__ = [
    "METHODS",
    "PROJECTIONS",
    "AdapterConfig",
    "add_adapters",
    "adapter_config_of",
    "base_state_dict",
    "cached_adapted_weights",
    "export_checkpoint",
    "has_adapters",
    "iter_projection_adapters",
    "load_adapters",
    "merge_adapters",
    "read_adapter_config",
    "resolve_layers",
    "save_adapters",
    "trainable_share",
]
