"""The model's eval preprocessing on image tensors: batched JPEG decoding, resize, crop, normalise.

The tensor counterpart of the PIL pipeline in :mod:`.images`, run on the encoder's device (nvJPEG
on CUDA; the same code with ``device="cpu"`` is what the tests cover): :func:`decode_jpegs`, then
:func:`preprocess_decoded`. The resize implements open_clip's ``shortest`` and ``squash`` modes
(:data:`BATCHED_RESIZE_MODES`) with bicubic or bilinear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from ..errors import DataError, MoraError
from .images import decode_image_bytes, normalize_uint8

JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI marker followed by the first segment's marker
BATCHED_RESIZE_MODES = ("shortest", "squash")  # the resize modes implemented here
MAX_RESIZE_GROUP = 64  # images per batched interpolate (bounds the float32 working set)


def resized_shape(height: int, width: int, size: int, mode: str = "shortest") -> tuple[int, int]:
    """``(h, w)`` after the model's resize: short side to ``size`` (as torchvision's
    ``Resize(int)``, long side truncated) or, for ``squash``, ``size x size``."""
    if mode == "squash":
        return size, size
    if mode != "shortest":
        raise MoraError(f"resize mode '{mode}' has no batched implementation "
                        f"(expected one of: {', '.join(BATCHED_RESIZE_MODES)})")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of the centred ``size x size`` window (torchvision's ``center_crop`` rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


@dataclass(frozen=True)
class ResizeGroup:
    """Images of one source shape, resized by one batched ``interpolate`` and cropped alike."""

    indices: tuple[int, ...]  # positions in the batch
    source: tuple[int, int]  # (h, w) as decoded
    resized: tuple[int, int]  # (h, w) after the resize (== source: no resize needed)
    crop: tuple[int, int]  # (top, left) of the size x size window in the resized image


def plan_resize_groups(
    shapes: Sequence[tuple[int, int]], size: int, mode: str = "shortest", max_group: int = MAX_RESIZE_GROUP
) -> list[ResizeGroup]:
    """Group a batch's images by decoded ``(h, w)``: one resize per group of at most ``max_group``.

    Groups come in order of each shape's first appearance, indices ascending; every index
    appears exactly once.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise MoraError(f"image {i} of the batch has an empty shape {(h, w)}")
        by_shape.setdefault((int(h), int(w)), []).append(i)
    groups = []
    step = max(1, int(max_group))
    for (h, w), indices in by_shape.items():
        rh, rw = resized_shape(h, w, size, mode)
        top, left = crop_origin(rh, rw, size)
        for s in range(0, len(indices), step):
            groups.append(ResizeGroup(tuple(indices[s : s + step]), (h, w), (rh, rw), (top, left)))
    return groups


def decode_jpegs(data: Any, offsets: Sequence[int], paths: Sequence[str],
                 device: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """Decode the JPEGs held back to back in ``data`` (uint8) on ``device``, in one call.

    Returns uint8 ``[3, h, w]`` images (``None`` for failures) and ``(index, message)`` per
    failure. When the batched call fails, each file is retried alone and then with PIL, so one
    bad file only costs itself, and a JPEG the tensor decoder cannot read (e.g. CMYK on some
    nvJPEG versions) is still decoded.
    """
    blobs = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    if not blobs:
        return [], []
    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)), []
    except RuntimeError:
        pass
    images: list[Any] = []
    bad: list[tuple[int, str]] = []
    for i, (blob, path) in enumerate(zip(blobs, paths)):
        try:
            images.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            continue
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        try:
            images.append(pil_to_tensor(decode_image_bytes(blob.numpy().tobytes(), path)).to(device))
        except DataError as exc:
            images.append(None)
            bad.append((i, f"{exc} (tensor JPEG decoder: {reason})"))
    return images, bad


def resize_crop(images: Sequence[Any], size: int, mode: str = "shortest", interpolation: str = "bicubic",
                max_group: int = MAX_RESIZE_GROUP) -> tuple[Any, list[int]]:
    """Resize and centre-crop uint8 ``[3, h, w]`` images of any sizes: ``(pixels, order)``.

    ``pixels`` is float32 ``[B, 3, size, size]`` in 0..255, rounded as the uint8 result of the
    PIL preprocessing would be; row ``j`` is ``images[order[j]]``. Same-size images are
    resized together (:func:`plan_resize_groups`) and land in consecutive rows, so the batch
    is assembled from slice copies alone (no index tensor, nothing that waits for the device).
    """
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    order: list[int] = []
    for group in plan_resize_groups([tuple(img.shape[-2:]) for img in images], size, mode, max_group):
        x = torch.stack([images[i] for i in group.indices]).float()
        if group.resized != group.source:
            x = F.interpolate(x, size=group.resized, mode=interpolation, antialias=True, align_corners=False)
        top, left = group.crop
        rows = slice(len(order), len(order) + len(group.indices))
        out[rows] = x[:, :, top : top + size, left : left + size].clamp_(0, 255).round_()
        order.extend(group.indices)
    return out, order


def preprocess_decoded(images: Sequence[Any], cfg: dict[str, Any], dtype: Any = None,
                       mean_std: tuple[Any, Any] | None = None) -> tuple[Any, list[int]]:
    """The model's preprocessing (``cfg``: size, mean, std, interpolation, resize_mode) of
    decoded uint8 ``[3, h, w]`` images, batched, on their device: ``([B, 3, S, S] in dtype, order)``
    with ``order`` as in :func:`resize_crop`. ``mean_std``: the statistics (default: ``cfg``'s)."""
    pixels, order = resize_crop(images, int(cfg["size"]), str(cfg.get("resize_mode", "shortest")),
                                str(cfg.get("interpolation", "bicubic")))
    mean, std = mean_std if mean_std is not None else (cfg["mean"], cfg["std"])
    return normalize_uint8(pixels, mean, std, dtype or torch.float32), order
