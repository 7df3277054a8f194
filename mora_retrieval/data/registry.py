"""Look up a classification dataset by name: ``food101``, ``mmimdb``, ``hateful-memes``."""

from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .base import ClassificationDataset

CLASSIFICATION_DATASETS = ("food101", "mmimdb", "hateful_memes")


def canonical_name(name: str) -> str:
    """``hateful-memes`` → ``hateful_memes`` etc.; unknown names raise DataError."""
    key = name.strip().lower().replace("-", "_")
    if key not in CLASSIFICATION_DATASETS:
        raise DataError(f"unknown dataset {name!r} (expected one of: food101, mmimdb, hateful-memes)")
    return key


def get_classification_dataset(name: str, root: str | os.PathLike, split: str, **kwargs: Any) -> ClassificationDataset:
    """Build the named dataset; ``kwargs`` go to its constructor (transform, skip_bad_images, ...)."""
    key = canonical_name(name)
    if key == "food101":
        from .food101 import Food101 as cls
    elif key == "mmimdb":
        from .mmimdb import MMIMDb as cls
    else:
        from .hateful_memes import HatefulMemes as cls
    return cls(root, split, **kwargs)
