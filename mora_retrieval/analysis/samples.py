"""Image–text samples of a split and their embeddings under several models in one pass.

``PairedSamples`` holds each distinct image once and, per text, the image it belongs to (a
classification sample is one image and its text; a CIRR triplet is a reference image and its
caption, and a reference serves several captions). Every image is decoded once and fed to every
model, so the adapted and the original model see exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..data.base import ImageDataset
from ..errors import DataError
from ..device import resolve_precision
from ..model.backbone import Backbone
from ..model.encode import collect, encode_image_batch, encode_texts, ordered_loader


@dataclass
class PairedSamples:
    """Distinct images, texts, the image of each text, and per-text labels: class indices ``[N]`` or multi-hot
    ``[N, C]`` (``None`` when the data has no classes)."""

    image_paths: list[Path]
    texts: list[str]
    pair_image: list[int]
    labels: torch.Tensor | None = None
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.pair_image):
            raise ValueError(f"{len(self.texts)} texts but {len(self.pair_image)} image references")
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.labels)} labels for {len(self.texts)} texts")
        if any(not 0 <= i < len(self.image_paths) for i in self.pair_image):
            raise ValueError("a text refers to an image that is not in the sample set")

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, pairs: Any) -> "PairedSamples":
        """The samples ``pairs`` (indices of texts), keeping only the images they use."""
        pairs = [int(i) for i in pairs]
        used = sorted({self.pair_image[i] for i in pairs})
        new_index = {old: new for new, old in enumerate(used)}
        return replace(self, image_paths=[self.image_paths[i] for i in used], texts=[self.texts[i] for i in pairs],
                       pair_image=[new_index[self.pair_image[i]] for i in pairs],
                       labels=None if self.labels is None else self.labels[pairs])


def spread_indices(total: int, limit: int | None) -> np.ndarray:
    """``limit`` indices evenly spread over ``range(total)`` (all when ``limit`` is None or larger): deterministic,
    and it covers datasets stored class by class."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, num=limit).round().astype(np.int64))


class _ImageFiles(ImageDataset):
    """Items ``{"image", "index"}`` over a list of files (``None`` for a skipped bad image)."""

    def __init__(self, paths: list[Path], transform: Callable, skip_bad_images: bool) -> None:
        super().__init__(transform, skip_bad_images)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._item(self.paths[index], index=index)


@dataclass
class Embeddings:
    """Raw (unnormalised) float32 CPU embeddings of one model: images ``[M, D]``, texts ``[N, D]``."""

    image: torch.Tensor
    text: torch.Tensor


def encode_samples(models: Mapping[str, Backbone], samples: PairedSamples, transform: Callable, batch_size: int = 64,
                   num_workers: int = 0, skip_bad_images: bool = False
                   ) -> tuple[PairedSamples, dict[str, Embeddings]]:
    """Embed every image and text with each model (eval mode, all on one device); raw features. Returns the
    samples that survived (pairs whose image was a skipped bad image are dropped) and ``{name: Embeddings}``."""
    device = next(next(iter(models.values())).model.parameters()).device
    precision = resolve_precision("auto", device)

    def encode_batch(batch: dict[str, Any]) -> dict[str, Any]:  # every model sees the batch's pixels
        return {"index": batch["index"], **{name: encode_image_batch(m.model, batch["image"], device, precision).cpu()
                                            for name, m in models.items()}}

    images = _ImageFiles(samples.image_paths, transform, skip_bad_images)
    out = collect(ordered_loader(images, batch_size, device, num_workers), encode_batch, device)
    row_of = {image: row for row, image in enumerate(out["index"].tolist())} if out else {}
    pairs = [i for i, image in enumerate(samples.pair_image) if image in row_of]
    if not pairs:
        raise DataError("no sample left to analyse: every image was unreadable and skipped")
    used = sorted({samples.pair_image[i] for i in pairs})  # the image order of samples.select(pairs)
    rows = torch.tensor([row_of[image] for image in used], dtype=torch.long)
    samples = samples.select(pairs)
    texts = {name: encode_texts(m.model, m.tokenizer, samples.texts, device, precision).cpu()
             for name, m in models.items()}
    return samples, {name: Embeddings(image=out[name][rows], text=texts[name]) for name in models}
