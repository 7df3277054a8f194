"""The model's eval preprocessing on image tensors: batched JPEG decoding, resize, crop, normalise.

The tensor counterpart of the PIL pipeline in :mod:`.images`, run on the encoder's device (nvJPEG
on CUDA; the same code with ``device="cpu"`` is what the tests cover): :func:`decode_jpegs`, then
:func:`preprocess_decoded`. The resize implements open_clip's ``shortest`` and ``squash`` modes
(:data:`BATCHED_RESIZE_MODES`) with bicubic or bilinear interpolation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import DataError, MoraError
from .images import decode_image_bytes, normalize_uint8

JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI marker followed by the first segment's marker
BATCHED_RESIZE_MODES = ("shortest", "squash")  # the resize modes implemented here
MAX_RESIZE_GROUP = 64  # images per batched interpolate (bounds the float32 working set)


def plan_resize_groups(shapes: Sequence[tuple[int, int]], max_group: int = MAX_RESIZE_GROUP) -> list[tuple[int, ...]]:
    """Batch positions grouped by decoded ``(h, w)``, at most ``max_group`` per group (one resize
    each): groups in order of each shape's first appearance, positions ascending."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise MoraError(f"image {i} of the batch has an empty shape {(h, w)}")
        by_shape.setdefault((int(h), int(w)), []).append(i)
    step = max(1, int(max_group))
    return [tuple(indices[s : s + step]) for indices in by_shape.values() for s in range(0, len(indices), step)]


def decode_jpegs(data: Any, offsets: Sequence[int], paths: Sequence[str],
                 device: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """Decode the JPEGs held back to back in ``data`` (uint8) on ``device``, in one call: uint8
    ``[3, h, w]`` images (``None`` for failures) and ``(index, message)`` per failure.

    When the batched call fails, each file is retried alone and then with PIL, so one bad file only
    costs itself and a JPEG the tensor decoder cannot read (e.g. CMYK on some nvJPEG) still decodes.
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
            images.append(TF.pil_to_tensor(decode_image_bytes(blob.numpy().tobytes(), path)).to(device))
        except DataError as exc:
            images.append(None)
            bad.append((i, f"{exc} (tensor JPEG decoder: {reason})"))
    return images, bad


def resize_crop(images: Sequence[Any], size: int, mode: str = "shortest", interpolation: str = "bicubic",
                max_group: int = MAX_RESIZE_GROUP) -> tuple[Any, list[int]]:
    """Resize and centre-crop uint8 ``[3, h, w]`` images of any sizes: ``(pixels, order)``.

    ``pixels`` is float32 ``[B, 3, size, size]`` in 0..255, rounded as the PIL preprocessing's uint8
    would be; row ``j`` is ``images[order[j]]``. Same-size images are resized together into
    consecutive rows, so the batch is assembled from slice copies alone (nothing waits for the device).
    """
    if mode not in BATCHED_RESIZE_MODES:
        raise MoraError(f"resize mode '{mode}' has no batched implementation "
                        f"(expected one of: {', '.join(BATCHED_RESIZE_MODES)})")
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=images[0].device)
    order: list[int] = []
    for indices in plan_resize_groups([tuple(img.shape[-2:]) for img in images], max_group):
        x = torch.stack([images[i] for i in indices]).float()
        x = TF.resize(x, size if mode == "shortest" else [size, size], InterpolationMode(interpolation), antialias=True)
        rows = slice(len(order), len(order) + len(indices))
        out[rows] = TF.center_crop(x, [size, size]).clamp_(0, 255).round_()
        order.extend(indices)
    return out, order


def preprocess_decoded(images: Sequence[Any], cfg: dict[str, Any], dtype: Any = None,
                       mean_std: tuple[Any, Any] | None = None) -> tuple[Any, list[int]]:
    """The model's preprocessing (``cfg``) of decoded uint8 ``[3, h, w]`` images, on their device:
    ``([B, 3, S, S] in dtype, order)`` as in :func:`resize_crop`; ``mean_std`` default: ``cfg``'s."""
    pixels, order = resize_crop(images, int(cfg["size"]), str(cfg.get("resize_mode", "shortest")),
                                str(cfg.get("interpolation", "bicubic")))
    mean, std = mean_std if mean_std is not None else (cfg["mean"], cfg["std"])
    return normalize_uint8(pixels, mean, std, dtype or torch.float32), order
