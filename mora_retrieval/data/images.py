"""Image decoding, the bad-image policy, and the two preprocessing pipelines.

Bad images. Every dataset checks up front that all its image files exist (a missing file is a
:class:`DataError` naming it). Whether a file *decodes* is checked lazily, when an item is read:
by default a corrupt file raises ``DataError("<path>: unreadable or corrupt image (...)")``;
with ``skip_bad_images=True`` the item comes back as ``None``, the file is recorded in the
dataset's ``bad_images`` log (``.count``, ``.paths``) and a warning is logged. Batch such
datasets with :func:`collate_skip_none`. With DataLoader workers each worker keeps its own log
copy; the warnings still reach the log output.

Preprocessing. ``make_transform("clip", size)`` is open_clip's eval transform (resize the short
side, bicubic; centre crop; CLIP mean/std). ``make_transform("targetpad", size)`` is CLIP4CIR's
"targetpad" (METHOD.md §4): images whose aspect ratio is at least ``ratio`` (1.25) are first
padded symmetrically with black up to ``long_side / ratio`` on the short side, then processed as
above.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from ..errors import DataError

# CLIP's normalisation constants (the same numbers as open_clip.constants).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORM_KINDS = ("clip", "targetpad")

_log = logging.getLogger(__name__)


#: File endings the toolkit treats as images when it scans folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB PIL image, or raise a one-line DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder (expected an image file)")
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        raise DataError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from None


def decode_image_bytes(data: bytes, origin: str) -> Image.Image:
    """Decode an encoded image held in memory (``origin`` names it in errors) as RGB."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:
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


class ImageReader:
    """Reads images under a bad-image policy; datasets own one and expose its ``log``."""

    def __init__(self, skip_bad_images: bool = False) -> None:
        self.skip_bad_images = skip_bad_images
        self.log = BadImageLog()

    def read(self, path: str | os.PathLike, data: bytes | None = None) -> Image.Image | None:
        """The decoded image, or ``None`` (logged) when it is bad and skipping is on.

        With ``data``, decode those bytes and use ``path`` only to name them.
        """
        try:
            return load_image(path) if data is None else decode_image_bytes(data, str(path))
        except DataError as exc:
            if not self.skip_bad_images:
                raise
            self.log.add(path, str(exc))
            _log.warning("skipping bad image: %s", exc)
            return None


def require_files(paths: Iterable[str | os.PathLike], what: str = "image file") -> None:
    """Raise one DataError naming the first missing file (and how many others are missing)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: {what} not found{more}")


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise a DataError if it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found (expected a folder)")
    return path


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` after dropping the ``None`` items of skipped bad images.

    An all-``None`` batch collates to ``None``; training loops should skip it.
    """
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


@dataclass(frozen=True)
class TargetPad:
    """Pad the short side with black so that ``long / short <= ratio`` (no-op below ``ratio``)."""

    ratio: float = 1.25

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        target = max(w, h) / self.ratio
        pad_w = max(int((target - w) / 2), 0)
        pad_h = max(int((target - h) / 2), 0)
        if pad_w == 0 and pad_h == 0:
            return image
        canvas = Image.new(image.mode, (w + 2 * pad_w, h + 2 * pad_h), 0)
        canvas.paste(image, (pad_w, pad_h))
        return canvas


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def targetpad_transform(
    image_size: int,
    ratio: float = 1.25,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Callable[[Image.Image], Any]:
    """CLIP4CIR's targetpad preprocessing (METHOD.md §4) as a torchvision Compose."""
    from torchvision import transforms as T

    return T.Compose([
        TargetPad(ratio),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def make_transform(kind: str, image_size: int) -> Callable[[Image.Image], Any]:
    """``"clip"``: open_clip's eval transform; ``"targetpad"``: :func:`targetpad_transform`."""
    if kind == "clip":
        import open_clip

        return open_clip.image_transform(image_size, is_train=False)
    if kind == "targetpad":
        return targetpad_transform(image_size)
    raise DataError(f"unknown transform kind {kind!r} (expected one of: {', '.join(TRANSFORM_KINDS)})")
