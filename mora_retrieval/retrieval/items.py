"""Collections to index: the rows of an index folder's items table.

An :class:`Item` is one image: its path and, for COCO, its image id, the set of its
annotated category ids and its primary category (the category with the largest total
annotated area; ties go to the smaller id). Those labels are what ``eval coco`` needs, so
they are stored in the index folder (``items.jsonl``) and eval needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..data.coco import COCOImages
from ..data.images import IMAGE_EXTENSIONS, require_dir
from ..errors import DataError


@dataclass(frozen=True)
class Item:
    """One indexed image."""

    path: str
    image_id: int | None = None
    categories: tuple[int, ...] = ()
    primary_category: int | None = None

    def to_row(self, row: int) -> dict:
        return {"row": row, **asdict(self)}

    @classmethod
    def from_row(cls, data: dict) -> "Item":
        return cls(
            path=str(data["path"]),
            image_id=data.get("image_id"),
            categories=tuple(int(c) for c in data.get("categories") or ()),
            primary_category=data.get("primary_category"),
        )


def coco_items(root: str | Path, split: str = "val2017") -> list[Item]:
    """The docs/protocols.md §5 gallery of ``split`` under ``root``: every image with at least one
    instance annotation (``annotations/instances_{split}.json``), ordered by image id."""
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
    root = require_dir(root, "image folder")
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
