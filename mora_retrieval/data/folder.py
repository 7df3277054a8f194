"""Image–caption pairs from a plain folder: every image with a sidecar ``.txt`` caption file.

``root/a/cat.jpg`` + ``root/a/cat.txt`` (one caption per non-empty line: one pair per line).
This is the layout of img2dataset-style dumps and the simplest one to make by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .base import ImageDataset
from .images import IMAGE_EXTENSIONS, require_dir


class ImageCaptionFolder(ImageDataset):
    """Items ``{"image", "caption", "image_id", "index"}``; ``image_id`` is the image's relative path."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, skip_bad_images: bool = False):
        super().__init__(transform, skip_bad_images)
        self.root = require_dir(root, "image-caption folder")
        self.pairs: list[tuple[Path, str]] = []
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        for image in images:
            sidecar = image.with_suffix(".txt")
            if sidecar.is_file():
                lines = sidecar.read_text(encoding="utf-8").splitlines()
                self.pairs += [(image, line.strip()) for line in lines if line.strip()]
        if not self.pairs:
            raise DataError(f"{self.root}: no image with a sidecar caption file (expected e.g. x.jpg + x.txt)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, caption = self.pairs[index]
        return self._item(path, caption=caption, image_id=path.relative_to(self.root).as_posix(), index=index)
