"""Hateful Memes in its published layout (docs/protocols.md §6).

``img/<id>.png`` and one jsonl file per split with rows ``{id, img: "img/<id>.png", label, text}``.
``split`` maps to the labelled files used in the literature: ``train`` → ``train.jsonl``,
``val`` → ``dev_seen.jsonl``, ``test`` → ``test_seen.jsonl``. Binary task: ``label`` is a
``long`` scalar 0/1 and ``class_names`` are ``["not hateful", "hateful"]``.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ..errors import DataError
from .base import ClassificationDataset
from .images import require_choice, require_dir, require_files

HATEFUL_MEMES_SPLITS = {"train": "train.jsonl", "val": "dev_seen.jsonl", "test": "test_seen.jsonl"}


class HatefulMemes(ClassificationDataset):
    """Hateful Memes (binary): ``split`` in train | val | test."""

    name = "hateful_memes"
    task = "binary"

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.split = require_choice(split, HATEFUL_MEMES_SPLITS, "Hateful Memes split")
        self.root = require_dir(root, "Hateful Memes root")
        self.class_names = ["not hateful", "hateful"]
        path = self.root / HATEFUL_MEMES_SPLITS[split]
        if not path.is_file():
            raise DataError(f"{path}: Hateful Memes annotation file not found")
        self.ids: list[str] = []
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    label = int(row["label"])
                    image, text = str(row["img"]), str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise DataError(f"{path}:{lineno}: expected a JSON row with id, img, label (0|1), text "
                                    f"({exc.__class__.__name__}: {exc})") from None
                if label not in (0, 1):
                    raise DataError(f"{path}:{lineno}: label must be 0 or 1, got {label}")
                self.ids.append(str(row.get("id", "")))
                self.paths.append(self.root / image)
                self.texts.append(text)
                self.labels.append(label)
        require_files(self.paths, "Hateful Memes image")
