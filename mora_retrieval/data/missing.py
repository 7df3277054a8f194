"""The missing-modality protocol (docs/protocols.md §2).

A :class:`MissingSpec` names a scenario: ``none``, ``text:η``, ``image:η`` or ``both:η[:s]``
(η = share of samples with a missing modality; for ``both``, ``s`` = the share of those that lose
their *image*, default 0.5; no sample loses both). :func:`assign_missing` draws per-sample codes
(0 complete, 1 text missing, 2 image missing) with exact counts: ``round(η·n)`` samples miss a
modality, ``round(s·that)`` of them the image. The draw depends only on ``n`` and the spec (its
seed included).

:func:`stored_missing_codes` draws once per (dataset, split, type, ratio, both-split, seed) and
stores the codes as JSON in a folder, so every later run (train, val, test, other scenarios)
sees the same samples missing. :class:`WithMissingModality` applies codes to a dataset: a missing
text becomes ``""``; a missing image becomes a tensor of ones (``"ones"``, the paper) or the
transformed white image (``"white"``, the released code).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..fileio import read_json, write_json
from .images import require_choice

COMPLETE, TEXT_MISSING, IMAGE_MISSING = 0, 1, 2
MISSING_KINDS = ("none", "text", "image", "both")
MISSING_IMAGE_FILLS = ("ones", "white")


@dataclass(frozen=True)
class MissingSpec:
    """A missing-modality scenario; ``str(spec)`` round-trips through :meth:`parse`."""

    kind: str
    ratio: float = 0.0
    both_image_share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        require_choice(self.kind, MISSING_KINDS, "missing-modality type")
        if not 0.0 <= self.ratio <= 1.0 or not 0.0 <= self.both_image_share <= 1.0:
            raise DataError(f"missing-modality ratio and both-split must lie in [0, 1], got {self.ratio} and "
                            f"{self.both_image_share}")
        if self.kind == "none" and self.ratio != 0.0:
            raise DataError(f"missing-modality type 'none' takes no ratio (got {self.ratio})")

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> "MissingSpec":
        """``"none"``, ``"text:0.5"``, ``"image:0.3"``, ``"both:0.7"`` or ``"both:0.7:0.3"``."""
        m = re.fullmatch(r"\s*(none|text|image|both)(?::([0-9.eE+-]+))?(?::([0-9.eE+-]+))?\s*", text)
        bad = DataError(f"bad missing-modality spec {text!r} (expected none, text:R, image:R, both:R or both:R:S "
                        f"with R, S in [0, 1])")
        if not m:
            raise bad
        kind, ratio, share = m.groups()
        if (kind == "none") != (ratio is None) or (share is not None and kind != "both"):
            raise bad
        try:
            return cls(kind, float(ratio or 0.0), float(share) if share is not None else 0.5, seed)
        except ValueError:
            raise bad from None

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "both" and self.both_image_share != 0.5:
            return f"both:{self.ratio:g}:{self.both_image_share:g}"
        return f"{self.kind}:{self.ratio:g}"

    def key(self) -> str:
        """A file-name-safe key for every field that determines the draw."""
        return f"{self.kind}-r{self.ratio:g}-s{self.both_image_share:g}-seed{self.seed}"


def assign_missing(n: int, spec: MissingSpec) -> np.ndarray:
    """Codes per sample (int8): 0 complete, 1 text missing, 2 image missing."""
    codes = np.zeros(n, dtype=np.int8)
    k = round(spec.ratio * n)  # 0 for "none"
    chosen = np.random.default_rng(spec.seed).permutation(n)[:k]
    k_image = {"text": 0, "image": k}.get(spec.kind, round(spec.both_image_share * k))
    codes[chosen[:k_image]] = IMAGE_MISSING
    codes[chosen[k_image:]] = TEXT_MISSING
    return codes


def stored_missing_codes(store_dir: str | os.PathLike, dataset_name: str, split: str, n: int,
                         spec: MissingSpec) -> np.ndarray:
    """The codes stored in ``store_dir`` for (dataset, split, spec), drawn and stored on first use."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dataset_name}__{split}__{spec.key()}")
    path = Path(store_dir) / f"{safe}.json"
    if path.exists():
        data = read_json(path, "missing-modality assignment file", error=DataError)
        codes = data.get("codes") if isinstance(data, dict) else None
        if not isinstance(codes, list) or any(c not in (0, 1, 2) for c in codes):
            raise DataError(f"{path}: expected a JSON object with a 'codes' list of 0/1/2")
        if len(codes) != n:
            raise DataError(f"{path}: stored for {len(codes)} samples but {dataset_name}/{split} has {n}; "
                            f"the dataset changed: delete the file to draw again")
        return np.asarray(codes, dtype=np.int8)
    codes = assign_missing(n, spec)
    write_json(path, {
        "dataset": dataset_name, "split": split, "spec": str(spec), "kind": spec.kind,
        "ratio": spec.ratio, "both_image_share": spec.both_image_share, "seed": spec.seed,
        "n": n, "counts": dict(zip(("complete", "text_missing", "image_missing"),
                                   np.bincount(codes, minlength=3).tolist())),
        "codes": codes.tolist(),
    })
    return codes


class WithMissingModality(Dataset):
    """Applies codes to a dataset's items (``image`` and ``text``/``caption``) and adds their ``missing`` code.

    Skipped items (``None``) stay ``None``. Once one real image has been seen, image-missing samples of
    datasets with ``item_without_image`` are not decoded at all (their image would be replaced anyway).
    """

    def __init__(self, dataset: Any, codes: np.ndarray, missing_image: str = "ones") -> None:
        require_choice(missing_image, MISSING_IMAGE_FILLS, "missing-image fill")
        if len(codes) != len(dataset):
            raise DataError(f"missing-modality codes cover {len(codes)} samples but the dataset has {len(dataset)}")
        self.dataset = dataset
        self.codes = np.asarray(codes, dtype=np.int8)
        self.missing_image = missing_image
        self._white: dict[tuple[int, ...], Any] = {}
        self._image_like: Any = None  # a transformed image of this dataset: the blank's shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _blank(self, image: torch.Tensor) -> torch.Tensor:
        if self.missing_image == "ones":
            return torch.ones_like(image)
        shape = tuple(image.shape)
        if shape not in self._white:
            transform = getattr(self.dataset, "transform", None)
            if transform is None:
                raise DataError("the 'white' missing-image fill needs the dataset's transform")
            self._white[shape] = transform(Image.new("RGB", (shape[-1], shape[-2]), (255, 255, 255)))
        return self._white[shape].clone()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        code = int(self.codes[index])
        if code == IMAGE_MISSING and self._image_like is not None and hasattr(self.dataset, "item_without_image"):
            item = {**self.dataset.item_without_image(index), "image": self._image_like}  # blanked below
        else:
            item = self.dataset[index]
            if item is None:
                return None
            item = dict(item)
            if "image" in item:
                if not isinstance(item["image"], torch.Tensor):
                    raise DataError("WithMissingModality needs a dataset whose transform returns tensors")
                if self._image_like is None:
                    self._image_like = item["image"]
        if code == TEXT_MISSING:
            item["text" if "text" in item else "caption"] = ""
        elif code == IMAGE_MISSING:
            item["image"] = self._blank(item["image"])
        item["missing"] = code
        return item
