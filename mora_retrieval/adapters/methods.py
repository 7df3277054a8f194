"""Adapter methods as registered strategies (after PEFT's ``LoraVariant`` and timm's registry).

Each method's rules are one :class:`AdapterMethod`, registered where the method is defined:
MoRA and its ablations in ``mora.py``, LoRA and DoRA in ``lora.py``, BitFit and full in
``inject.py``, the prompt baselines DCP and MMP in ``prompts.py``. The toolkit asks
:func:`get_method`; :func:`list_methods` gives the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import AdapterError


@dataclass(frozen=True)
class AdapterMethod:
    """One method's rules.

    Parts: ``shared`` names the tensors of each layer slot (shared by the paired vision and text
    blocks), ``specific`` and ``magnitudes`` those of each adapted projection; they are what
    ``adapter.safetensors`` saves, with the base tensors the method trains. Factories:
    ``make_projection(W0, config, slot, tower)`` and ``make_slot(config, d_vision, d_text, dtype=,
    device=)``; a method with neither adds no modules. Freeze rule: ``trains_base(name)`` names
    the backbone parameters that train (None: none). ``convention = (key, value, meaning)`` is
    written into ``adapter_config.json`` and required at load.

    Prompt methods: ``make_prompts(config, widths, depths, dtype=, device=)`` builds the module
    that inserts learnable tokens into both towers (``prompts.py``); ``prompt_defaults`` is its
    ``(prompt_length, prompt_depth)`` when the config gives none. ``mergeable`` is False for
    methods whose change is not a weight change (prompts): merging them is refused.
    """

    name: str
    default_alpha: float | None = None  # α when the config gives none; None: α = r (LoRA's scale α/r = 1)
    shared: tuple[str, ...] = ()
    specific: tuple[str, ...] = ()
    magnitudes: tuple[str, ...] = ()
    make_projection: Callable[..., Any] | None = None
    make_slot: Callable[..., Any] | None = None
    trains_base: Callable[[str], bool] | None = None
    convention: tuple[str, str, str] | None = None
    make_prompts: Callable[..., Any] | None = None
    prompt_defaults: tuple[int, int] | None = None
    mergeable: bool = True

    def alpha(self, alpha: float | None, r: int) -> float:
        """The α in use: the configured one, else the method's default."""
        return float(alpha if alpha is not None else r if self.default_alpha is None else self.default_alpha)


_REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    """Add ``method`` to the registry (at import of the module that defines it)."""
    if method.name in _REGISTRY:
        raise ValueError(f"adapter method '{method.name}' is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterError(f"unknown adapter method '{name}' (choose from {', '.join(list_methods())})") from None


def list_methods() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)
