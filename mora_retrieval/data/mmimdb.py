"""MM-IMDb in its published layout (docs/protocols.md §6).

``split.json`` (``{"train": [ids], "dev": [ids], "test": [ids]}``; ``val`` reads ``dev``) and,
per movie, ``<id>.json`` (``plot``: list of strings, ``genres``: list) with ``<id>.jpeg``: either
both flat in ``dataset/`` (the published archive) or as ``images/<id>.jpeg`` + ``labels/<id>.json``.

One sample per plot (a movie with three plots gives three samples sharing its poster and labels;
a movie without any plot gives one sample with an empty text). Labels are a multi-hot float
vector over the 23 genres of :data:`MMIMDB_GENRES` (matched ignoring case, spaces and hyphens);
other genres are dropped.
"""

from __future__ import annotations

import os
from typing import Callable

from ..errors import DataError
from ..fileio import read_json
from .base import ClassificationDataset
from .images import require_choice, require_dir, require_files

MMIMDB_GENRES = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)
MMIMDB_SPLITS = {"train": "train", "val": "dev", "test": "test"}


def _genre_key(name: str) -> str:
    return name.lower().replace("-", "").replace(" ", "")


_GENRE_INDEX = {_genre_key(g): i for i, g in enumerate(MMIMDB_GENRES)}


def genres_to_multihot(genres: list[str]) -> list[float]:
    """Multi-hot vector over :data:`MMIMDB_GENRES`; unknown genres are dropped."""
    vec = [0.0] * len(MMIMDB_GENRES)
    for g in genres:
        i = _GENRE_INDEX.get(_genre_key(str(g)))
        if i is not None:
            vec[i] = 1.0
    return vec


class MMIMDb(ClassificationDataset):
    """MM-IMDb (multilabel, 23 genres): ``split`` in train | val | test."""

    name = "mmimdb"
    task = "multilabel"

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None,
                 skip_bad_images: bool = False) -> None:
        super().__init__(transform, skip_bad_images)
        self.split = require_choice(split, MMIMDB_SPLITS, "MM-IMDb split")
        self.root = require_dir(root, "MM-IMDb root")
        self.class_names = list(MMIMDB_GENRES)
        if (self.root / "dataset").is_dir():
            meta_dir = image_dir = self.root / "dataset"
        elif (self.root / "labels").is_dir():
            meta_dir, image_dir = self.root / "labels", self.root / "images"
        else:
            raise DataError(f"{self.root}: MM-IMDb movies not found (expected dataset/ or images/ + labels/)")
        split_path = self.root / "split.json"
        splits = read_json(split_path, "MM-IMDb split file", error=DataError)
        key = MMIMDB_SPLITS[split]
        if not isinstance(splits, dict) or not isinstance(splits.get(key), list):
            raise DataError(f"{split_path}: expected a JSON object with a list of movie ids under {key!r}")
        self.movie_ids: list[str] = []
        for movie_id in splits[key]:
            meta_path, image_path = meta_dir / f"{movie_id}.json", image_dir / f"{movie_id}.jpeg"
            meta = read_json(meta_path, "MM-IMDb movie file", error=DataError)
            if not isinstance(meta, dict) or not isinstance(meta.get("genres", []), list):
                raise DataError(f"{meta_path}: expected a JSON object with 'plot' and a 'genres' list")
            plots = meta.get("plot") or [""]
            if isinstance(plots, str):
                plots = [plots]
            label = genres_to_multihot(meta.get("genres", []))
            for plot in plots:
                self.paths.append(image_path)
                self.texts.append(str(plot))
                self.labels.append(label)
                self.movie_ids.append(str(movie_id))
        require_files(sorted(set(map(str, self.paths))), "MM-IMDb poster")
