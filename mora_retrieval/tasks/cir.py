"""CLIP4CIR (Baldrati et al.) with any adapter method: stage-1 and stage-2 training modules.

Stage 1 (encoder adaptation): query ``normalize(f_img(ref) + f_txt(caption))``, target
``normalize(f_img(target))``, cross-entropy over ``100 · query @ targetsᵀ`` with the other
targets of the (per-process) batch as negatives. Reference and target images go through the
image tower in one batch.

Stage 2 (Combiner): the merged encoders are frozen; the features of every triplet are computed
once (:func:`encode_split`, :meth:`TripletFeatures.from_split`) and the Combiner trains on them with the same loss.

Validation (both stages) uses the CIRR metrics of :mod:`.cirr_metrics` on the val split: the
gallery is encoded once per evaluation and the reference features are looked up in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.images import collate_skip_none
from ..engine.module import TrainModule
from ..device import autocast
from .cirr_metrics import cirr_recalls
from .combiner import Combiner

LOGIT_SCALE = 100.0


class CaptionCollate:
    """Collate dict items and tokenise their ``caption`` field (runs in DataLoader workers)."""

    def __init__(self, tokenizer: Callable, field: str = "caption"):
        self.tokenizer = tokenizer
        self.field = field

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        batch = collate_skip_none(items)
        if batch is not None and self.field in batch:
            batch["tokens"] = self.tokenizer(list(batch[self.field]))
        return batch


def contrastive_loss(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``100 · normalize(query) @ normalize(target)ᵀ`` against the diagonal."""
    logits = LOGIT_SCALE * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits.float(), torch.arange(len(logits), device=logits.device))


@torch.no_grad()
def encode_images(model: nn.Module, dataset: Dataset, key: str, device: torch.device, precision: str = "fp32",
                  batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, list[Any]]:
    """Raw (unnormalised) image features of ``dataset[i][key]``, and the items' ``name``/``index``."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_none,
                        pin_memory=device.type == "cuda")
    feats, ids = [], []
    for batch in loader:
        if batch is None:
            continue
        with autocast(device, precision):
            feats.append(model.encode_image(batch[key].to(device, non_blocking=True)).float())
        ids.extend(batch.get("name", batch.get("index")))
    return torch.cat(feats), list(ids)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], device: torch.device,
                 precision: str = "fp32", batch_size: int = 512) -> torch.Tensor:
    """Raw (unnormalised) text features."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        with autocast(device, precision):
            out.append(model.encode_text(tokens).float())
    return torch.cat(out)


@dataclass
class SplitFeatures:
    """Raw features of a split: every gallery image once, and one text feature per caption."""

    gallery: torch.Tensor
    names: list[str]
    text: torch.Tensor

    def of(self, names: Sequence[str]) -> torch.Tensor:
        """Gallery features of the images ``names`` (references, targets), looked up by name."""
        index = {name: i for i, name in enumerate(self.names)}
        return self.gallery[[index[name] for name in names]]


@torch.no_grad()
def encode_split(model: nn.Module, tokenizer: Callable, gallery: Dataset, captions: Sequence[str],
                 device: torch.device, precision: str = "fp32", batch_size: int = 256,
                 num_workers: int = 0) -> SplitFeatures:
    """Encode a split's gallery (items with ``image`` and ``name``) and its captions."""
    feats, names = encode_images(model, gallery, "image", device, precision, batch_size, num_workers)
    return SplitFeatures(feats, names, encode_texts(model, tokenizer, captions, device, precision))


@dataclass
class CIRRValidation:
    """The val split, ready for evaluation: gallery dataset and per-query metadata."""

    gallery: Dataset  # items with "image" and "name" (CIRRGallery)
    captions: list[str]
    reference_names: list[str]
    target_names: list[str]
    subset_members: list[list[str]]
    batch_size: int = 256
    num_workers: int = 0

    @classmethod
    def from_triplets(cls, triplets, gallery, batch_size: int = 256, num_workers: int = 0) -> "CIRRValidation":
        recs = triplets.records
        return cls(gallery, [r["caption"] for r in recs], [r["reference"] for r in recs],
                   [r["target_hard"] for r in recs], [list(r["img_set"]["members"]) for r in recs],
                   batch_size, num_workers)

    def encode(self, model, tokenizer, device, precision) -> SplitFeatures:
        return encode_split(model, tokenizer, self.gallery, self.captions, device, precision, self.batch_size,
                            self.num_workers)

    def metrics(self, query: torch.Tensor, gallery: torch.Tensor, names: list[str]) -> dict[str, float]:
        sim = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T
        return cirr_recalls(sim, names, self.reference_names, self.target_names, self.subset_members)


def composed_query(image_raw: torch.Tensor, text_raw: torch.Tensor, combiner: nn.Module | None = None) -> torch.Tensor:
    """The CIR query: the Combiner when given, else ``normalize(image + text)`` of raw features."""
    if combiner is not None:
        return combiner(image_raw, text_raw)
    return F.normalize(image_raw + text_raw, dim=-1)


class CIRStage1(TrainModule):
    """Stage 1: adapt the encoders (adapters already injected into ``model``)."""

    main_metric = "avg"
    higher_is_better = True

    def __init__(self, model: nn.Module, tokenizer: Callable, validation: CIRRValidation | None,
                 precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.validation = validation
        self.precision = precision
        self.prefix_caches = None

    def enable_prefix_cache(self, storage: str | torch.device = "cpu") -> bool:
        """Cache the frozen leading blocks' outputs per image name and caption across epochs.

        Valid only for deterministic inputs (no random augmentation). Returns whether any tower
        has a frozen prefix to cache (none with ``full`` or ``bitfit``).
        """
        from .prefix_cache import FrozenPrefixCache

        caches = (FrozenPrefixCache(self.model.visual.transformer, storage),
                  FrozenPrefixCache(self.model.transformer, storage))
        self.prefix_caches = caches if any(c.active for c in caches) else None
        return self.prefix_caches is not None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        n = batch["reference"].shape[0]
        images = torch.cat([batch["reference"], batch["target"]])
        if self.prefix_caches is None:
            features = self.model.encode_image(images)
            text = self.model.encode_text(batch["tokens"])
        else:
            image_cache, text_cache = self.prefix_caches
            names = list(batch["reference_name"]) + list(batch["target_name"])
            features = image_cache.encode(self.model.encode_image, images, names)
            text = text_cache.encode(self.model.encode_text, batch["tokens"], list(batch["caption"]))
        return contrastive_loss(features[:n] + text, features[n:])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.validation is None:
            return {"avg": float("nan")}
        feats = self.validation.encode(self.model, self.tokenizer, device, self.precision)
        query = composed_query(feats.of(self.validation.reference_names), feats.text)
        return self.validation.metrics(query, feats.gallery, feats.names)


class TripletFeatures(Dataset):
    """Cached stage-2 features: items ``{"reference", "text", "target"}`` (raw features)."""

    def __init__(self, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor):
        if not (len(reference) == len(text) == len(target)):
            raise ValueError("feature tensors must have the same length")
        self.reference, self.text, self.target = reference, text, target

    def __len__(self) -> int:
        return len(self.reference)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"reference": self.reference[i], "text": self.text[i], "target": self.target[i]}

    @classmethod
    def from_split(cls, feats: SplitFeatures, records: Sequence[dict[str, Any]]) -> "TripletFeatures":
        """Per-triplet features (on the CPU) of ``encode_split(..., [r["caption"] for r in records])``."""
        return cls(feats.of([r["reference"] for r in records]).cpu(), feats.text.cpu(),
                   feats.of([r["target_hard"] for r in records]).cpu())


class CIRStage2(TrainModule):
    """Stage 2: train the Combiner on cached features of the frozen, merged encoders."""

    main_metric = "avg"
    higher_is_better = True

    def __init__(self, combiner: Combiner, validation: TripletFeatures | None = None,
                 val_meta: CIRRValidation | None = None, gallery: tuple[torch.Tensor, list[str]] | None = None):
        super().__init__()
        self.combiner = combiner
        self.val_features = validation
        self.val_meta = val_meta
        self.val_gallery = gallery

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        query = self.combiner(batch["reference"], batch["text"])
        return contrastive_loss(query, batch["target"])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.val_features is None or self.val_meta is None or self.val_gallery is None:
            return {"avg": float("nan")}
        query = self.combiner(self.val_features.reference.to(device), self.val_features.text.to(device))
        gallery, names = self.val_gallery
        return self.val_meta.metrics(query.cpu(), gallery, names)
