"""Look up a classification dataset by name: ``food101``, ``mmimdb``, ``hateful-memes``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .base import ClassificationDataset
from .food101 import Food101
from .hateful_memes import HatefulMemes
from .mmimdb import MMIMDb

DATASET_CLASSES = {"food101": Food101, "mmimdb": MMIMDb, "hateful_memes": HatefulMemes}


def canonical_name(name: str) -> str:
    """``hateful-memes`` → ``hateful_memes`` etc.; unknown names raise DataError."""
    key = name.strip().lower().replace("-", "_")
    if key not in DATASET_CLASSES:
        raise DataError(f"unknown dataset {name!r} (expected one of: food101, mmimdb, hateful-memes)")
    return key


def get_classification_dataset(name: str, root: str | os.PathLike, split: str, **kwargs: Any) -> ClassificationDataset:
    """Build the named dataset; ``kwargs`` go to its constructor (transform, skip_bad_images, ...)."""
    return DATASET_CLASSES[canonical_name(name)](root, split, **kwargs)
