"""What ``train_cirr`` reads: CIRR triplets and galleries, from the prepared-image cache or the image files.

With the prepared cache (the default) each split's gallery is decoded and preprocessed once, with
the model's own preprocessing, into a memory-mapped uint8 file (:mod:`mora_retrieval.data.prepared`)
that every epoch and later run reuses; batches carry uint8 pixels (one buffer per batch from a
DataLoader worker), normalised on the training device. Without it, the image files are decoded every
epoch with the equivalent PIL transform; on the CPU both give bit-identical pixels.

Bad images (``skip_bad_images``): the triplets whose reference or target is unreadable are left out
of stage 1, stage 2 and validation, and counted in :attr:`CIRInputs.dropped`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ...data.cirr import CIRRGallery, CIRRTriplets, read_image_split
from ...data.collate import CaptionCollate
from ...data.images import PreprocessSpec, make_transform
from ...data.prepared import PreparedImages, default_prepared_dir, prepare_images, prepared_path


def usable_positions(records: Sequence[dict[str, Any]], known: Container[str]) -> list[int]:
    """Positions of the triplets whose reference and target (where the split has targets) are ``known`` images."""
    return [i for i, r in enumerate(records)
            if r["reference"] in known and r.get("target_hard", r["reference"]) in known]


def usable_records(records: Sequence[dict[str, Any]], prepared: PreparedImages) -> tuple[list[dict[str, Any]], int]:
    """The triplets whose images are ok in ``prepared``; and how many were left out."""
    ok = {name for name, good in zip(prepared.names, prepared.ok) if good}
    keep = [records[i] for i in usable_positions(records, ok)]
    return keep, len(records) - len(keep)


class PreparedTriplets(Dataset):
    """Training triplets whose images are ok in a prepared gallery, as rows and a caption (no pixels:
    :class:`PreparedTripletCollate` gathers them per batch); ``dropped`` counts the others."""

    def __init__(self, records: Sequence[dict[str, Any]], prepared: PreparedImages) -> None:
        self.records, self.dropped = usable_records(records, prepared)
        self.prepared = prepared
        self.reference_rows = np.array([prepared.row(r["reference"]) for r in self.records], dtype=np.int64)
        self.target_rows = np.array([prepared.row(r["target_hard"]) for r in self.records], dtype=np.int64)

    @property
    def needed_rows(self) -> torch.Tensor:
        """The gallery rows the triplets use (references and targets), sorted, unique."""
        return torch.from_numpy(np.union1d(self.reference_rows, self.target_rows))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"reference_row": int(self.reference_rows[index]), "target_row": int(self.target_rows[index]),
                "caption": self.records[index]["caption"], "index": int(index)}


class PreparedTripletCollate(CaptionCollate):
    """Items of :class:`PreparedTriplets` -> a batch with ``pixels`` uint8 ``[2B, 3, H, W]`` (references,
    then targets, in one gather). Once the shared-memory flag ``read_pixels`` is cleared
    (:meth:`.stages.CIRStage1.enable_prefix_cache`), even persistent workers send batches without ``pixels``.
    """

    def __init__(self, prepared: PreparedImages, tokenizer: Callable) -> None:
        super().__init__(tokenizer)
        self.prepared = prepared
        self.read_pixels = torch.ones((), dtype=torch.bool).share_memory_()

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(items)
        if bool(self.read_pixels):
            batch["pixels"] = self.prepared.batch(torch.cat([batch["reference_row"], batch["target_row"]]).numpy())
        return batch


class PreparedGallery(Dataset):
    """The ok images of a prepared split; :meth:`collate` batches them into one uint8 ``pixels`` tensor."""

    def __init__(self, prepared: PreparedImages) -> None:
        self.prepared = prepared
        self.rows = np.flatnonzero(prepared.ok)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        return {"row": row, "name": self.prepared.names[row]}

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rows = [item["row"] for item in items]
        return {"pixels": self.prepared.batch(rows), "name": [item["name"] for item in items]}


@dataclass
class CIRInputs:
    """The datasets of a CIR run: stage-1 triplets and their collate, the train and val galleries, the val records."""

    train: Dataset
    collate: Callable
    train_gallery: Dataset
    val_gallery: Dataset
    val_records: list[dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)  # triplets left out for bad images, per split


def cir_inputs(data_root: str | os.PathLike, spec: PreprocessSpec, tokenizer: Callable, *, prepared: bool = True,
               prepared_dir: str | os.PathLike | None = None, skip_bad_images: bool = False,
               workers: int | None = None) -> CIRInputs:
    """CIRR's training and validation inputs under ``spec``: the prepared caches (built or reused in
    ``prepared_dir``, default :func:`~mora_retrieval.data.prepared.default_prepared_dir`), or the image files."""
    if not prepared:
        kw = {"transform": make_transform(spec), "skip_bad_images": skip_bad_images}
        train, val = CIRRTriplets(data_root, "train", **kw), CIRRTriplets(data_root, "val", **kw)
        return CIRInputs(train, CaptionCollate(tokenizer), CIRRGallery(data_root, "train", **kw),
                         CIRRGallery(data_root, "val", **kw), list(val.records))
    train_triplets, val_triplets = CIRRTriplets(data_root, "train"), CIRRTriplets(data_root, "val")
    directory = default_prepared_dir(data_root) if prepared_dir is None else prepared_dir
    images = {}
    for split in ("train", "val"):  # cirr-train-<H>x<W>.npy, cirr-val-…; rows named by the CIRR image names
        paths = read_image_split(data_root, split)
        images[split] = prepare_images(list(paths.values()), spec, prepared_path(directory, f"cirr-{split}", spec),
                                       names=list(paths), skip_bad_images=skip_bad_images, workers=workers)
    train = PreparedTriplets(train_triplets.records, images["train"])
    val_records, val_dropped = usable_records(val_triplets.records, images["val"])
    return CIRInputs(train, PreparedTripletCollate(images["train"], tokenizer), PreparedGallery(images["train"]),
                     PreparedGallery(images["val"]), val_records, {"train": train.dropped, "val": val_dropped})
