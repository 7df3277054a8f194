"""Image decoding, the bad-image policy, and the model's preprocessing.

Bad images. Every dataset checks up front that its image files exist; whether one *decodes* is
checked when its item is read: a corrupt file raises ``DataError("<path>: unreadable or corrupt
image (...)")``, or with ``skip_bad_images=True`` the item is ``None``, logged as a warning and
in the dataset's ``bad_images`` (one copy per DataLoader worker).

Preprocessing comes from the model (:func:`preprocess_spec`): :func:`make_transform` is open_clip's
own eval transform (with CLIP4CIR's targetpad in front when asked, docs/protocols.md §4),
:func:`make_uint8_transform` the same stopped before the float conversion, which
:func:`normalize_uint8`, the toolkit's one pixel normalisation, finishes on any device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image, ImageOps
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

from ..errors import DataError

TRANSFORM_KINDS = ("clip", "targetpad")
#: CLIP4CIR's targetpad ratio (docs/protocols.md §4).
TARGETPAD_RATIO = 1.25
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "longest", "squash")

#: File endings the toolkit treats as images when it scans folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Decode ``path`` fully as an RGB PIL image, or raise a one-line DataError. ``draft``: decode a JPEG
    at the smallest 1/2, 1/4 or 1/8 scale whose sides are still at least ``draft`` pixels (PIL's draft mode)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder (expected an image file)")
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    return _decode(path, path, draft)


def decode_image_bytes(data: bytes, origin: str) -> Image.Image:
    """Decode an encoded image held in memory (``origin`` names it in errors) as RGB."""
    return _decode(io.BytesIO(data), origin)


def _decode(source: Path | io.BytesIO, origin: str | Path, draft: int | None = None) -> Image.Image:
    try:
        with Image.open(source) as img:
            if draft:
                img.draft("RGB", (draft, draft))
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        raise DataError(f"{origin}: unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from None


@dataclass
class BadImageLog:
    """Images skipped under ``skip_bad_images=True``: how many, which, and why."""

    paths: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.paths)

    def add(self, path: str | os.PathLike, reason: str) -> None:
        if str(path) not in self.paths:
            self.paths.append(str(path))
            self.reasons.append(reason)


def require_files(paths: Iterable[str | os.PathLike], what: str = "image file") -> None:
    """Raise one DataError naming the first missing file (and how many others are missing)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: {what} not found{more}")


def require_choice(value: str, choices: Iterable[str], what: str) -> str:
    """Return ``value``, or raise ``DataError("unknown <what> 'x' (expected one of: a, b)")``."""
    choices = list(choices)
    if value not in choices:
        raise DataError(f"unknown {what} {value!r} (expected one of: {', '.join(choices)})")
    return value


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise a DataError if it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found (expected a folder)")
    return path


@dataclass(frozen=True)
class TargetPad:
    """Pad the short side with black so that ``long / short <= ratio`` (no-op below ``ratio``)."""

    ratio: float = TARGETPAD_RATIO

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        target = max(w, h) / self.ratio
        pad_w, pad_h = max(int((target - w) / 2), 0), max(int((target - h) / 2), 0)
        return ImageOps.expand(image, (pad_w, pad_h, pad_w, pad_h), fill=0)


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    values = (values,) * 3 if isinstance(values, (int, float)) else tuple(values)
    if len(values) != 3:
        raise DataError(f"preprocessing {what} needs 3 values (one per RGB channel), got {list(values)}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessSpec:
    """A model's eval preprocessing as plain data (``size``: ``(height, width)``, an int means a square),
    plus CLIP4CIR's targetpad when ``targetpad_ratio`` is set."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    targetpad_ratio: float | None = None

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise DataError(f"preprocessing size must be a positive int or (height, width), got {self.size!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if min(self.std) <= 0:
            raise DataError(f"preprocessing std must be positive, got {list(self.std)}")
        require_choice(self.interpolation, INTERPOLATIONS, "interpolation")
        require_choice(self.resize_mode, RESIZE_MODES, "resize mode")
        if self.targetpad_ratio is not None and not self.targetpad_ratio >= 1.0:
            raise DataError(f"targetpad ratio must be at least 1, got {self.targetpad_ratio}")

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any], targetpad_ratio: float | None = None) -> "PreprocessSpec":
        """From an open_clip preprocessing config dict (open_clip's defaults fill the missing keys).
        Eval treats interpolation ``"random"`` as bicubic, as open_clip does."""
        full = merge_preprocess_dict(PreprocessCfg(), cfg)
        interpolation = "bicubic" if full["interpolation"] == "random" else full["interpolation"]
        return cls(size=full["size"], mean=full["mean"], std=full["std"], interpolation=interpolation,
                   resize_mode=full["resize_mode"], fill_color=int(full["fill_color"]), targetpad_ratio=targetpad_ratio)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def key(self) -> str:
        """SHA-256 (hex) of the fields: equal keys, equal preprocessing."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def preprocess_spec(model: Any, kind: str = "clip") -> PreprocessSpec:
    """The eval preprocessing of an open_clip ``model`` (its ``visual.preprocess_cfg``);
    ``kind="targetpad"`` adds CLIP4CIR's targetpad in front."""
    ratio = TARGETPAD_RATIO if require_choice(kind, TRANSFORM_KINDS, "transform kind") == "targetpad" else None
    return PreprocessSpec.from_open_clip(open_clip.get_model_preprocess_cfg(model), targetpad_ratio=ratio)


def make_transform(kind: str | PreprocessSpec, image_size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform of a :class:`PreprocessSpec`: PIL image -> normalised float ``[3, H, W]``.
    ``make_transform("clip" | "targetpad", size)``, the older form, uses open_clip's default (OpenAI)
    statistics whatever the model."""
    if isinstance(kind, PreprocessSpec):
        if image_size is not None:
            raise TypeError("make_transform(spec) takes no image_size: the spec holds the size")
        spec = kind
    elif image_size is None:
        raise TypeError(f"make_transform({kind!r}, image_size) needs the image size")
    else:
        ratio = TARGETPAD_RATIO if require_choice(kind, TRANSFORM_KINDS, "transform kind") == "targetpad" else None
        spec = PreprocessSpec.from_open_clip({"size": image_size}, targetpad_ratio=ratio)
    cfg = PreprocessCfg(size=spec.size, mean=spec.mean, std=spec.std, interpolation=spec.interpolation,
                        resize_mode=spec.resize_mode, fill_color=spec.fill_color)
    transform = image_transform_v2(cfg, is_train=False)
    if spec.targetpad_ratio is not None:
        transform.transforms.insert(0, TargetPad(spec.targetpad_ratio))
    return transform


def split_transform(transform: Callable) -> tuple[Compose, tuple[float, ...], tuple[float, ...]] | None:
    """``(uint8_stage, mean, std)`` of a ``Compose`` ending in ``ToTensor`` + ``Normalize``, else ``None``:
    ``normalize_uint8(uint8_stage(img), mean, std)`` is ``transform(img)``, bit for bit on the CPU."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list) or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    if not isinstance(to_tensor, ToTensor) or not isinstance(normalize, Normalize):
        return None
    return Compose([*steps[:-2], PILToTensor()]), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))


def make_uint8_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    """``spec``'s transform before ToTensor and Normalize: PIL image -> uint8 ``[3, H, W]``."""
    split = split_transform(make_transform(spec))
    if split is None:
        raise RuntimeError("open_clip's eval transform no longer ends with ToTensor, Normalize")
    return split[0]


def normalize_uint8(pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                    dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> torch.Tensor:
    """Pixel values ``[..., 3, H, W]`` (uint8, or float in 0..255) -> ``(x / 255 - mean) / std`` as ``dtype``.

    They move to ``device`` (default: where they are) before the float conversion, so uint8 moves a
    quarter of the bytes, and every copy is non-blocking (no host sync). The float32 arithmetic is
    torchvision's ``ToTensor`` + ``Normalize``, bit-identical on the CPU; ``dtype`` only rounds the result.
    """
    if pixels.dtype != torch.uint8 and not pixels.dtype.is_floating_point:
        raise TypeError(f"normalize_uint8 expects uint8 (or float 0..255) pixels, got {pixels.dtype}")
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    # a tensor made from a sequence with device= would be a blocking copy (a host sync on CUDA)
    mean, std = (torch.as_tensor(v, dtype=torch.float32).to(pixels.device, non_blocking=True).view(-1, 1, 1)
                 for v in (mean, std))
    out = pixels.to(torch.float32, copy=True).div_(255)  # a copy: a float32 input stays as it was
    out.sub_(mean).div_(std)
    return out if dtype == torch.float32 else out.to(dtype)


def load_batch(paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor], draft: int | None = None
               ) -> tuple[torch.Tensor | None, list[tuple[int, str]]]:
    """Decode and transform ``paths`` into ONE tensor ``[n, ...]`` (one shared-memory buffer per
    DataLoader batch). Rows that do not decode stay zeros and are listed as ``(row, message)``;
    the tensor is None when none decodes. ``draft`` as in :func:`load_image`.
    """
    out: torch.Tensor | None = None
    bad: list[tuple[int, str]] = []
    for row, path in enumerate(paths):
        try:
            image = transform(load_image(path, draft))
        except DataError as exc:
            bad.append((row, str(exc)))
            continue
        if out is None:
            out = torch.zeros((len(paths), *image.shape), dtype=image.dtype)
        elif image.shape != out.shape[1:]:
            raise DataError(f"{path}: the preprocessing gives {list(image.shape)} pixels, the batch's first image "
                            f"{list(out.shape[1:])} (the transform must give one size)")
        out[row] = image
    return out, bad
