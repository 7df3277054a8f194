"""``AdapterConfig``: which adapter method, where, and with which ranks and strength."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from itertools import zip_longest
from typing import Any

from ..errors import AdapterError, check_field_kinds
from .methods import get_method

PROJECTIONS = ("q", "k", "v", "out")
PROMPT_FIELDS = ("prompt_length", "prompt_depth")


@dataclass
class AdapterConfig:
    """Adapter placement and hyper-parameters.

    ``layers`` selects the last N blocks of each tower, paired from the end (slot ``j`` of ``n``
    pairs vision block ``L_v - n + j`` with text block ``L_t - n + j``); ``vision_layers`` and
    ``text_layers`` give explicit block indices instead, paired in the order given. ``None`` for
    ``alpha``, ``prompt_length`` (tokens added per block) or ``prompt_depth`` (the first N blocks of
    each tower get prompts) takes the method's default; prompt methods ignore the projection fields.
    """

    method: str = "mora"
    r: int = 4
    r_shared: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")
    layers: int | None = 2
    vision_layers: tuple[int, ...] | None = None
    text_layers: tuple[int, ...] | None = None
    prompt_length: int | None = None
    prompt_depth: int | None = None

    def __post_init__(self) -> None:
        check_field_kinds(self, AdapterError, "adapter config")
        self.targets = tuple(self.targets)
        self.vision_layers, self.text_layers = (
            None if blocks is None else tuple(int(i) for i in blocks) for blocks in (self.vision_layers, self.text_layers))
        get_method(self.method)  # one line naming the known methods when unknown
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise AdapterError(f"adapter targets must be a non-empty subset of q, k, v, out (got {list(self.targets)})")
        if len(set(self.targets)) != len(self.targets):
            raise AdapterError(f"adapter targets repeat a projection: {list(self.targets)}")
        if self.r < 1 or self.r_shared < 1:
            raise AdapterError(f"adapter ranks must be >= 1 (got r={self.r}, r_shared={self.r_shared})")
        if self.layers is not None and self.layers < 1:
            raise AdapterError(f"layers must be >= 1 (got {self.layers})")
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 1:  # check_field_kinds: an int or None
                raise AdapterError(f"{name} must be a whole number >= 1 (got {value!r})")

    def resolved_prompts(self) -> tuple[int, int]:
        """``(prompt_length, prompt_depth)`` in use: the configured ones, else the method's defaults."""
        method = get_method(self.method)
        if method.prompt_defaults is None:
            raise AdapterError(f"method '{self.method}' adds no prompts")
        length, depth = method.prompt_defaults
        return (int(self.prompt_length if self.prompt_length is not None else length),
                int(self.prompt_depth if self.prompt_depth is not None else depth))

    def resolved_alpha(self) -> float:
        return get_method(self.method).alpha(self.alpha, self.r)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields. Prompt methods record their resolved prompt length and depth; other
        methods leave the prompt fields out (their records stay as they were)."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in PROMPT_FIELDS}
        if get_method(self.method).prompt_defaults is not None:
            data["prompt_length"], data["prompt_depth"] = self.resolved_prompts()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_layers(config: AdapterConfig, depth_vision: int, depth_text: int) -> list[tuple[int | None, int | None]]:
    """The slots as ``(vision_block, text_block)`` pairs; ``None`` where a tower has no block. Out-of-range
    blocks, and one-tower slots of a method with a shared part, are an :class:`AdapterError`."""
    shared = bool(get_method(config.method).shared)
    if config.vision_layers is not None or config.text_layers is not None:
        vision, text = list(config.vision_layers or ()), list(config.text_layers or ())
    else:
        n = config.layers or 0
        if n > min(depth_vision, depth_text) and shared:
            raise AdapterError(f"layers={n} exceeds the shallower tower (vision {depth_vision}, text {depth_text} blocks)")
        vision = list(range(max(depth_vision - n, 0), depth_vision))
        text = list(range(max(depth_text - n, 0), depth_text))
    for tower, blocks, depth in (("vision", vision, depth_vision), ("text", text, depth_text)):
        for b in blocks:
            if not 0 <= b < depth:
                raise AdapterError(f"{tower} block {b} does not exist (the {tower} tower has {depth} blocks)")
        if len(set(blocks)) != len(blocks):
            raise AdapterError(f"{tower} blocks repeat: {blocks}")
    if shared and len(vision) != len(text):
        raise AdapterError(
            f"method '{config.method}' shares parameters between paired vision and text blocks, but "
            f"{len(vision)} vision and {len(text)} text blocks were selected: give lists of equal length"
        )
    return list(zip_longest(vision, text))
