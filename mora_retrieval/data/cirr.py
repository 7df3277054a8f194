"""CIRR in its published layout (docs/protocols.md §6).

``root/captions/cap.rc2.{split}.json`` holds the triplets, ``root/image_splits/split.rc2.{split}.json``
maps every image name of the split to its path relative to ``root`` (``./train/34/<name>.png``,
``./dev/<name>.png``, ``./test1/<name>.png``). ``split`` is ``train``, ``val`` (whose images live
under ``dev/``) or ``test1`` (no target fields).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from ..fileio import read_json
from .base import ImageDataset
from .images import require_choice, require_dir, require_files

CIRR_SPLITS = ("train", "val", "test1")


def read_image_split(root: str | os.PathLike, split: str) -> dict[str, Path]:
    """``{name: absolute path}`` for every image of the split, in file order."""
    split = require_choice(split, CIRR_SPLITS, "CIRR split")
    root = require_dir(root, "CIRR root")
    path = root / "image_splits" / f"split.rc2.{split}.json"
    mapping = read_json(path, "CIRR image split file (a {name: relative path} object)", error=DataError)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"{path}: expected a JSON object mapping image names to relative paths")
    return {name: (root / rel).resolve() for name, rel in mapping.items()}


class CIRRGallery(ImageDataset):
    """Every image of a CIRR split: items ``{"image", "name", "index"}``."""

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.root = Path(root)
        self.split = split
        self.paths_by_name = read_image_split(root, split)
        self.names: list[str] = list(self.paths_by_name)
        require_files(self.paths_by_name.values(), "CIRR image")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        name = self.names[index]
        return self._item(self.paths_by_name[name], name=name, index=index)


class CIRRTriplets(ImageDataset):
    """CIRR triplets: items ``{"reference", "target", "caption", "pairid", "reference_name",
    "target_name", "index"}`` (no target fields for ``test1``)."""

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.root = Path(root)
        self.split = split
        self.has_targets = split != "test1"
        self.paths_by_name = read_image_split(root, split)
        path = self.root / "captions" / f"cap.rc2.{split}.json"
        records = read_json(path, "CIRR caption file (a list of triplets)", error=DataError)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of triplets")
        required = ("pairid", "reference", "caption", "img_set") + (("target_hard",) if self.has_targets else ())
        used: set[str] = set()
        for i, rec in enumerate(records):
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DataError(f"{path}: triplet #{i} lacks {', '.join(missing)}")
            names = [rec["reference"]] + ([rec["target_hard"]] if self.has_targets else [])
            for name in names:
                if name not in self.paths_by_name:
                    raise DataError(f"{path}: triplet #{i} names image {name!r}, absent from split.rc2.{split}.json")
            used.update(names)
        self.records: list[dict[str, Any]] = records
        require_files(sorted(str(self.paths_by_name[n]) for n in used), "CIRR image")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        reference = self._image(self.paths_by_name[rec["reference"]])
        if reference is None:
            return None
        item: dict[str, Any] = {"reference": reference, "caption": rec["caption"],
                                "pairid": int(rec["pairid"]), "reference_name": rec["reference"],
                                "index": index}
        if self.has_targets:
            target = self._image(self.paths_by_name[rec["target_hard"]])
            if target is None:
                return None
            item["target"] = target
            item["target_name"] = rec["target_hard"]
        return item
