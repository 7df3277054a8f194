"""MS-COCO in its published layout: ``annotations/{instances,captions}_{split}.json``, images in ``{split}/``.

Annotations are read with ``pycocotools`` (its console chatter is silenced). ``COCOImages`` is the
image gallery of docs/protocols.md §5: ordered by image id, and by default only the images with at least
one instance annotation. ``COCOCaptions`` yields one item per (image, caption) pair, for
contrastive pretraining.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable

from pycocotools.coco import COCO

from ..errors import DataError
from ..fileio import read_json
from .base import ImageDataset
from .images import require_dir, require_files


def _load_coco(path: Path, what: str, keys: tuple[str, ...]) -> Any:
    """A ``pycocotools.coco.COCO`` built from ``path`` after checking its top-level keys."""
    data = read_json(path, what, error=DataError)
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise DataError(f"{path}: not a COCO {what} (expected lists under: {', '.join(keys)})")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed COCO {what} (missing field {exc})") from None
    return coco


class COCOImages(ImageDataset):
    """COCO images of one split: items ``{"image", "image_id", "index", "path"}``."""

    def __init__(self, root: str | os.PathLike, split: str = "val2017", transform: Callable | None = None,
                 require_instances: bool = True, skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.root = require_dir(root, "COCO root")
        self.split = split
        ann = self.root / "annotations" / f"instances_{split}.json"
        self.coco = _load_coco(ann, "instances file", ("images", "annotations", "categories"))
        ids = sorted(self.coco.imgs)
        if require_instances:
            ids = [i for i in ids if self.coco.imgToAnns.get(i)]
        self.image_ids: list[int] = ids
        self.paths: list[Path] = [self.root / split / self.coco.imgs[i]["file_name"] for i in ids]
        require_files(self.paths, "COCO image")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._item(self.paths[index], image_id=self.image_ids[index], index=index, path=str(self.paths[index]))

    def _anns(self, image_id: int) -> list[dict[str, Any]]:
        if image_id not in self.coco.imgs:
            raise DataError(f"image id {image_id} is not in annotations/instances_{self.split}.json")
        return self.coco.imgToAnns.get(image_id, [])

    def categories_of(self, image_id: int) -> frozenset[int]:
        """The set of category ids annotated on the image (empty if none)."""
        return frozenset(a["category_id"] for a in self._anns(image_id))

    def primary_category(self, image_id: int) -> int:
        """The category with the largest total annotated area (ties: the smaller id)."""
        areas: dict[int, float] = {}
        for a in self._anns(image_id):
            areas[a["category_id"]] = areas.get(a["category_id"], 0.0) + float(a.get("area", 0.0))
        if not areas:
            raise DataError(f"image id {image_id} has no instance annotation in instances_{self.split}.json")
        return min(areas, key=lambda c: (-areas[c], c))


class COCOCaptions(ImageDataset):
    """One item per (image, caption): ``{"image", "caption", "image_id", "index"}``."""

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.root = require_dir(root, "COCO root")
        self.split = split
        path = self.root / "annotations" / f"captions_{split}.json"
        coco = _load_coco(path, "captions file", ("images", "annotations"))
        anns = sorted(coco.dataset["annotations"], key=lambda a: (a["image_id"], a.get("id", 0)))
        for a in anns:
            if a["image_id"] not in coco.imgs or not isinstance(a.get("caption"), str):
                raise DataError(f"{path}: caption annotation {a.get('id')} has no caption or an unknown image id")
        self.pairs: list[tuple[int, str]] = [(a["image_id"], a["caption"]) for a in anns]
        self.paths_by_id: dict[int, Path] = {i: self.root / split / img["file_name"] for i, img in coco.imgs.items()}
        require_files(sorted({str(self.paths_by_id[i]) for i, _ in self.pairs}), "COCO image")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image_id, caption = self.pairs[index]
        return self._item(self.paths_by_id[image_id], caption=caption, image_id=image_id, index=index)
