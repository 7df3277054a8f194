"""Collections to index: the rows of an index folder's items table.

An :class:`Item` is one image: its path and, for COCO, its image id, the set of its
annotated category ids and its primary category (the category with the largest total
annotated area; ties go to the smaller id). Those labels are what ``eval coco`` needs, so
they are stored in the index folder (``items.jsonl``) and eval needs nothing else.

* :func:`coco_items` – the docs/protocols.md §5 gallery: every image of a split with at least one
  instance annotation, ordered by image id.
* :func:`folder_items` – every image under a folder (recursive, common extensions), sorted
  by relative path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..data.coco import COCOImages
from ..data.images import IMAGE_EXTENSIONS
from ..errors import DataError



@dataclass(frozen=True)
class Item:
    """One indexed image."""

    path: str
    image_id: int | None = None
    categories: tuple[int, ...] = field(default_factory=tuple)
    primary_category: int | None = None

    def to_row(self, row: int) -> dict:
        data = asdict(self)
        data["categories"] = list(self.categories)
        return {"row": row, **data}

    @classmethod
    def from_row(cls, data: dict) -> "Item":
        return cls(
            path=str(data["path"]),
            image_id=data.get("image_id"),
            categories=tuple(int(c) for c in data.get("categories") or ()),
            primary_category=data.get("primary_category"),
        )


def coco_items(root: str | Path, split: str = "val2017") -> list[Item]:
    """The COCO gallery of ``split`` under ``root`` (``annotations/instances_{split}.json``)."""
    images = COCOImages(root, split=split, require_instances=True)
    return [
        Item(
            path=str(Path(path).resolve()),
            image_id=int(image_id),
            categories=tuple(sorted(images.categories_of(image_id))),
            primary_category=int(images.primary_category(image_id)),
        )
        for image_id, path in zip(images.image_ids, images.paths)
    ]


def folder_items(root: str | Path) -> list[Item]:
    """Every image file under ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    paths = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise DataError(f"{root}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return [Item(path=str(p.resolve())) for p in paths]


def items_digest(items: Iterable[Item]) -> str:
    """A short hash of an item list, to tell whether a resumed run embeds the same images."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(item.to_row(0), sort_keys=True).encode())
    return digest.hexdigest()[:16]
