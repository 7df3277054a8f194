"""Features from an open_clip model: images, texts and the composed query, batched, under autocast.

Every feature extraction of the toolkit runs through :func:`collect`, the one loop over batches
(under ``torch.no_grad()`` and :func:`~mora_retrieval.device.autocast`). Features come out as
float32 and stay on the device they were computed on.

``precision="bf16"`` autocasts a model kept in fp32 (training's validation). A model whose weights
were cast once (the retrieval encoder, bf16 on CUDA) runs with the default ``"fp32"``, i.e. without
autocast, its image batches given in the weights' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.collate import collate_skip_none
from ..device import autocast


@torch.no_grad()
def collect(batches: Iterable[Any], step: Callable[[Any], dict[str, Any]], device: torch.device,
            precision: str = "fp32", progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``step(batch)`` for every batch (``None`` batches, all of whose items were skipped, are passed
    over); returns each key's tensors concatenated and its lists joined."""
    parts: dict[str, list] = {}
    for batch in batches:
        if batch is None:
            continue
        with autocast(device, precision):
            out = step(batch)
        for key, value in out.items():
            if isinstance(value, torch.Tensor):
                parts.setdefault(key, []).append(value)
            else:
                parts.setdefault(key, []).extend(value)
        if progress is not None:
            progress(len(next(iter(out.values()))))
    return {key: torch.cat(value) if value and isinstance(value[0], torch.Tensor) else value
            for key, value in parts.items()}


def ordered_loader(dataset: Dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                   collate_fn: Callable = collate_skip_none) -> DataLoader:
    """Every item once, in order (no shuffling, no dropped tail), pinned for a GPU."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=device.type == "cuda")


def encode_images(model: nn.Module, dataset: Dataset, device: torch.device, precision: str = "fp32", *,
                  key: str = "image", id_key: str = "name", batch_size: int = 256, num_workers: int = 0,
                  normalize: bool = False) -> tuple[torch.Tensor, list[Any]]:
    """Image features of ``dataset[i][key]`` and the items' ``id_key`` values (skipped items left out)."""
    out = collect(ordered_loader(dataset, batch_size, device, num_workers),
                  lambda batch: {"features": model.encode_image(batch[key].to(device, non_blocking=True)).float(),
                                 "ids": list(batch[id_key])}, device, precision)
    if not out:
        raise ValueError("no image to encode (the dataset is empty or every image was skipped)")
    return _normalized(out["features"], normalize), out["ids"]


def encode_image_batch(model: nn.Module, images: torch.Tensor, device: torch.device, precision: str = "fp32",
                       normalize: bool = False) -> torch.Tensor:
    """Features of one preprocessed image batch ``[B, 3, H, W]``."""
    with torch.no_grad(), autocast(device, precision):
        features = model.encode_image(images.to(device, non_blocking=True)).float()
    return _normalized(features, normalize)


def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], device: torch.device,
                 precision: str = "fp32", batch_size: int = 512, normalize: bool = False) -> torch.Tensor:
    """Features of a list of strings, tokenised and encoded ``batch_size`` at a time."""
    chunks = (tokenizer(list(texts[start:start + batch_size])) for start in range(0, len(texts), batch_size))
    out = collect(chunks, lambda tokens: {"features": model.encode_text(tokens.to(device)).float()}, device, precision)
    return _normalized(out["features"], normalize)


def composed_query(image_raw: torch.Tensor, text_raw: torch.Tensor, combiner: nn.Module | None = None) -> torch.Tensor:
    """The CIR query (CLIP4CIR) of *raw* (unnormalised) features: the Combiner when given, else
    ``normalize(image + text)``. A single text row is paired with every image row."""
    if text_raw.shape[0] == 1 and image_raw.shape[0] > 1:
        text_raw = text_raw.expand(image_raw.shape[0], -1)
    if combiner is not None:
        return combiner(image_raw, text_raw)
    return F.normalize(image_raw + text_raw, dim=-1)


def _normalized(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(features, dim=-1) if normalize else features
