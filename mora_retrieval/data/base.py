"""The part every image dataset shares: a transform and the bad-image policy."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import BadImageLog, decode_image_bytes, load_image

_log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Base class: ``_image`` decodes under the bad-image policy and applies ``transform``; ``bad_images``
    logs the images skipped so far (only with ``skip_bad_images=True``)."""

    def __init__(self, transform: Callable | None = None, skip_bad_images: bool = False) -> None:
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.bad_images = BadImageLog()

    def _image(self, path: str | os.PathLike, data: bytes | None = None) -> Any:
        """The transformed image (PIL if no transform), or ``None`` if it was bad and skipped.
        With ``data``, decode those bytes and use ``path`` only to name them."""
        try:
            image = load_image(path) if data is None else decode_image_bytes(data, str(path))
        except DataError as exc:
            if not self.skip_bad_images:
                raise
            self.bad_images.add(path, str(exc))
            _log.warning("skipping bad image: %s", exc)
            return None
        return image if self.transform is None else self.transform(image)

    def _item(self, path: str | os.PathLike, data: bytes | None = None, /, **fields: Any) -> dict[str, Any] | None:
        """``{"image": <its transformed image>, **fields}``, or ``None`` when the image is bad and skipped."""
        image = self._image(path, data)
        return None if image is None else {"image": image, **fields}


class ClassificationDataset(ImageDataset):
    """Image + text + label samples: items ``{"image", "text", "label", "index"}``. Subclasses fill
    ``paths``, ``texts`` and ``labels`` (class indices, or multi-hot lists for ``task == "multilabel"``)
    and set ``name``, ``task`` and ``class_names``."""

    name: str = ""
    task: str = "multiclass"

    def __init__(self, transform: Callable | None = None, skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.paths: list[os.PathLike] = []
        self.texts: list[str] = []
        self.labels: list[Any] = []
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def label_tensor(self, index: int) -> Any:
        """The label as a tensor: ``long`` scalar, or a ``float`` multi-hot vector."""
        return torch.tensor(self.labels[index], dtype=torch.float32 if self.task == "multilabel" else torch.long)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._item(self.paths[index], **self.item_without_image(index))

    def item_without_image(self, index: int) -> dict[str, Any]:
        """The item's text, label and index, without reading its image (for image-missing samples)."""
        return {"text": self.texts[index], "label": self.label_tensor(index), "index": index}
