"""UPMC Food-101 in its published layout (docs/protocols.md §6).

``images/{train,test}/<class>/<file>.jpg`` and ``texts/{train,test}_titles.csv`` (no header;
``file name, title text, class name``). Class names are the sorted class folders found under
``images/train`` and ``images/test`` (the CSV class names if there are none), so a root with
fewer classes than 101 works unchanged.

Validation split: the published data has only train and test, so ``val`` is carved out of
train deterministically. Rule: per class, sort its train rows by file name, shuffle them with
``numpy.random.default_rng([val_seed, crc32(class name)])`` and take the first
``round(val_fraction * n)`` (at least 1 when a class has 2 or more rows) as validation; ``train``
is the rest. Defaults ``val_fraction=0.1, val_seed=0`` (close to the common 61,142 / 6,846
split). The carve of a class depends only on that class's rows.
"""

from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from .base import ClassificationDataset
from .images import require_choice, require_dir, require_files

FOOD101_SPLITS = ("train", "val", "test")


def read_titles(path: Path) -> list[tuple[str, str, str]]:
    """Rows ``(file name, title, class name)`` of a ``*_titles.csv`` file."""
    if not path.is_file():
        raise DataError(f"{path}: Food-101 titles file not found")
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            for lineno, row in enumerate(csv.reader(handle), start=1):
                if not row:
                    continue
                if len(row) < 3:
                    raise DataError(f"{path}:{lineno}: expected 'file name, title, class name'")
                rows.append((row[0].strip(), ",".join(row[1:-1]), row[-1].strip()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None
    return rows


def carve_validation(rows: list[tuple[str, str, str]], val_fraction: float, val_seed: int) -> set[str]:
    """File names of the train rows that go to validation (see the module docstring)."""
    by_class: dict[str, list[str]] = {}
    for name, _, cls in rows:
        by_class.setdefault(cls, []).append(name)
    chosen: set[str] = set()
    for cls, names in by_class.items():
        names = sorted(names)
        k = round(val_fraction * len(names))
        if k == 0 and len(names) >= 2 and val_fraction > 0:
            k = 1
        order = np.random.default_rng([val_seed, zlib.crc32(cls.encode("utf-8"))]).permutation(len(names))
        chosen.update(names[i] for i in order[:k])
    return chosen


class Food101(ClassificationDataset):
    """UPMC Food-101 (multiclass): ``split`` in train | val | test."""

    name = "food101"
    task = "multiclass"

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False, val_fraction: float = 0.1, val_seed: int = 0) -> None:
        super().__init__(transform, skip_bad_images)
        self.split = require_choice(split, FOOD101_SPLITS, "Food-101 split")
        self.root = require_dir(root, "Food-101 root")
        source = "test" if split == "test" else "train"
        titles = self.root / "texts" / f"{source}_titles.csv"
        rows = read_titles(titles)
        folders = sorted({p.name for s in ("train", "test") if (self.root / "images" / s).is_dir()
                          for p in (self.root / "images" / s).iterdir() if p.is_dir()})
        self.class_names = folders or sorted({cls for _, _, cls in rows})
        index = {c: i for i, c in enumerate(self.class_names)}
        if split != "test":
            val = carve_validation(rows, val_fraction, val_seed)
            rows = [r for r in rows if (r[0] in val) == (split == "val")]
        for name, title, cls in rows:
            if cls not in index:
                raise DataError(f"{titles}: class {cls!r} of {name} has no folder under {self.root / 'images'}")
            self.paths.append(self.root / "images" / source / cls / name)
            self.texts.append(title)
            self.labels.append(index[cls])
        require_files(self.paths, "Food-101 image")
