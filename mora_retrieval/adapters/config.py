"""``AdapterConfig``: which adapter method, where, and with which ranks and strength."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import AdapterError

PROJECTIONS = ("q", "k", "v", "out")

#: MoRA and its ablations (paper Tables 4-5): all use the shared (S, Gram) part except ``no_shared``'s
#: coupling and ``no_specific``'s specific part, see ``mora.py``.
MORA_METHODS = ("mora", "no_gram", "learned_gram", "no_shared", "no_specific", "subtract_base")
LOW_RANK_METHODS = ("lora", "dora")
WHOLE_WEIGHT_METHODS = ("bitfit", "full")
METHODS = MORA_METHODS + LOW_RANK_METHODS + WHOLE_WEIGHT_METHODS


@dataclass
class AdapterConfig:
    """Adapter placement and hyper-parameters.

    ``layers`` selects the last N blocks of each tower, paired from the end (slot ``j`` of ``n``
    pairs vision block ``L_v - n + j`` with text block ``L_t - n + j``). ``vision_layers`` and
    ``text_layers`` give explicit block indices instead (paired in the order given).
    ``alpha=None`` takes the method's default: 0.01 for MoRA and its ablations (the deltas are
    scaled by α directly), ``r`` for LoRA/DoRA (scale α/r = 1, the usual PEFT choice).
    """

    method: str = "mora"
    r: int = 4
    r_shared: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "v")
    layers: int | None = 2
    vision_layers: tuple[int, ...] | None = None
    text_layers: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.vision_layers is not None:
            self.vision_layers = tuple(int(i) for i in self.vision_layers)
        if self.text_layers is not None:
            self.text_layers = tuple(int(i) for i in self.text_layers)
        if self.method not in METHODS:
            raise AdapterError(f"unknown adapter method '{self.method}' (choose from {', '.join(METHODS)})")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise AdapterError(f"adapter targets must be a non-empty subset of q, k, v, out (got {list(self.targets)})")
        if len(set(self.targets)) != len(self.targets):
            raise AdapterError(f"adapter targets repeat a projection: {list(self.targets)}")
        if self.r < 1 or self.r_shared < 1:
            raise AdapterError(f"adapter ranks must be >= 1 (got r={self.r}, r_shared={self.r_shared})")
        if self.layers is not None and self.layers < 1:
            raise AdapterError(f"layers must be >= 1 (got {self.layers})")

    @property
    def uses_shared(self) -> bool:
        """Whether the method has the modality-shared (S) part."""
        return self.method in MORA_METHODS

    @property
    def uses_specific(self) -> bool:
        """Whether the method has a per-projection low-rank (A, B) part."""
        return self.method in LOW_RANK_METHODS or (self.method in MORA_METHODS and self.method != "no_specific")

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return float(self.r) if self.method in LOW_RANK_METHODS else 0.01

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = list(self.targets)
        data["vision_layers"] = None if self.vision_layers is None else list(self.vision_layers)
        data["text_layers"] = None if self.text_layers is None else list(self.text_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_layers(config: AdapterConfig, depth_vision: int, depth_text: int) -> list[tuple[int | None, int | None]]:
    """Return the slots as ``(vision_block, text_block)`` pairs; ``None`` where a tower has no block.

    Raises :class:`AdapterError` for out-of-range blocks and, for methods with a shared part,
    for slots where only one tower is adapted.
    """
    if config.vision_layers is not None or config.text_layers is not None:
        vision = list(config.vision_layers or ())
        text = list(config.text_layers or ())
    else:
        n = config.layers or 0
        if n > min(depth_vision, depth_text) and config.uses_shared:
            raise AdapterError(
                f"layers={n} exceeds the shallower tower (vision {depth_vision}, text {depth_text} blocks)"
            )
        vision = list(range(max(depth_vision - n, 0), depth_vision))
        text = list(range(max(depth_text - n, 0), depth_text))
    for tower, blocks, depth in (("vision", vision, depth_vision), ("text", text, depth_text)):
        for b in blocks:
            if not 0 <= b < depth:
                raise AdapterError(f"{tower} block {b} does not exist (the {tower} tower has {depth} blocks)")
        if len(set(blocks)) != len(blocks):
            raise AdapterError(f"{tower} blocks repeat: {blocks}")
    if config.uses_shared and len(vision) != len(text):
        raise AdapterError(
            f"method '{config.method}' shares parameters between paired vision and text blocks, but "
            f"{len(vision)} vision and {len(text)} text blocks were selected: give lists of equal length"
        )
    width = max(len(vision), len(text))
    vision_padded = vision + [None] * (width - len(vision))
    text_padded = text + [None] * (width - len(text))
    return list(zip(vision_padded, text_padded))
