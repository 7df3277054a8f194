"""Shared builders for the retrieval tests (a tiny COCO-format world and a tiny model file)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# (image id, [(category id, area), ...]); image 6 has no annotation and is not in the gallery.
COCO_LAYOUT = [
    (1, [(1, 50.0)]),
    (2, [(1, 30.0), (2, 80.0)]),
    (3, [(2, 40.0)]),
    (4, [(1, 10.0), (2, 20.0)]),
    (5, [(3, 60.0)]),
    (6, []),
    (7, [(3, 15.0), (1, 5.0)]),
    (8, [(4, 99.0)]),
    (9, [(2, 70.0), (1, 70.0)]),
    (10, [(1, 20.0)]),
]


def write_tiny_coco(root: Path, split: str = "val2017", seed: int = 0) -> Path:
    """A COCO-format folder: ``annotations/instances_<split>.json`` and ``<split>/*.jpg``."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for image_id, objects in COCO_LAYOUT:
        name = f"{image_id:012d}.jpg"
        w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for cat, area in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "area": area,
                         "bbox": [0, 0, 5, 5], "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in (1, 2, 3, 4)]
    with open(root / "annotations" / f"instances_{split}.json", "w") as fh:
        json.dump({"images": images, "annotations": anns, "categories": cats}, fh)
    return root


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random mora-tiny weights, saved as an open_clip checkpoint so a manifest can reload them."""
    import torch

    from mora_retrieval.model.backbone import load_backbone
    from mora_retrieval.fileio import save_tensors

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_backbone("mora-tiny").model
    save_tensors(path, model.state_dict())
    return path
