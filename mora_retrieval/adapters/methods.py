"""Adapter methods as registered strategies (after PEFT's ``LoraVariant`` and timm's registry): one
:class:`AdapterMethod` each, registered where the method is defined (MoRA and its ablations in ``mora.py``,
LoRA and DoRA in ``lora.py``, BitFit and full in ``inject.py``, DCP and MMP in ``prompts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import AdapterError


@dataclass(frozen=True)
class AdapterMethod:
    """One method's rules; a method without factories (``make_*``) adds no modules. The tensors that
    ``shared``, ``specific`` and ``magnitudes`` name are what ``adapter.safetensors`` saves, with the base
    tensors the method trains."""

    name: str
    default_alpha: float | None = None  # α when the config gives none; None: α = r (LoRA's scale α/r = 1)
    shared: tuple[str, ...] = ()  # the tensors of each layer slot (shared by its paired vision and text blocks)
    specific: tuple[str, ...] = ()  # the tensors of each adapted projection
    magnitudes: tuple[str, ...] = ()  # the magnitude vectors of each adapted projection
    make_projection: Callable[..., Any] | None = None  # (W0, config, slot, tower) -> the projection's adapter
    make_slot: Callable[..., Any] | None = None  # (config, d_vision, d_text, dtype=, device=) -> the slot's module
    trains_base: Callable[[str], bool] | None = None  # names the backbone parameters that train (None: none)
    convention: tuple[str, str, str] | None = None  # (key, value, meaning) in adapter_config.json, checked at load
    make_prompts: Callable[..., Any] | None = None  # (config, widths, depths, dtype=, device=) -> prompts.py module
    prompt_defaults: tuple[int, int] | None = None  # (prompt_length, prompt_depth) when the config gives none
    mergeable: bool = True  # False when the change is not a weight change (prompts): merging is refused

    def alpha(self, alpha: float | None, r: int) -> float:
        """The α in use: the configured one, else the method's default."""
        return float(alpha if alpha is not None else r if self.default_alpha is None else self.default_alpha)


_REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> None:
    """Add ``method`` to the registry (at import of the module that defines it)."""
    if method.name in _REGISTRY:
        raise ValueError(f"adapter method '{method.name}' is registered twice")
    _REGISTRY[method.name] = method


def get_method(name: str) -> AdapterMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterError(f"unknown adapter method '{name}' (choose from {', '.join(list_methods())})") from None


def list_methods() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)
