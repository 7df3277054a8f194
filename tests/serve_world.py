"""The index the server tests (and benchmarks/bench_serve.py) serve: the tiny shapes world's
COCO-format val images, embedded by a seeded random mora-tiny saved as a checkpoint file, so the
manifest can reload the model as ``mora-ret search`` does."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def build_shapes_index(root: Path, seed: int = 0) -> dict[str, Any]:
    """Write the world, the checkpoint and ``root/index``; return paths, the folder and encoder."""
    import torch

    from mora_retrieval.model.backbone import load_backbone
    from mora_retrieval.data.shapes import generate_shapes_world
    from mora_retrieval.fileio import save_tensors
    from mora_retrieval.retrieval.build import BuildConfig, build_index
    from mora_retrieval.retrieval.embed import EmbedConfig
    from mora_retrieval.retrieval.encoder import load_encoder
    from mora_retrieval.retrieval.items import coco_items

    world = generate_shapes_world(root / "world", "tiny", seed=seed)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_tensors(root / "tiny.safetensors", load_backbone("mora-tiny").model.state_dict())
        encoder = load_encoder("mora-tiny", str(root / "tiny.safetensors"), device="cpu")
    coco = world["coco"]
    built = build_index(encoder, coco_items(coco, "val2017"), root / "index",
                        BuildConfig(embed=EmbedConfig(batch_size=16, workers=0)),
                        collection={"kind": "coco", "root": str(coco.resolve()), "split": "val2017"})
    return {"root": root, "world": world, "coco": coco, "index": root / "index", "folder": built.folder,
            "encoder": encoder, "checkpoint": root / "tiny.safetensors"}
