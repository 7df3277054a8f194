"""CLIP4CIR (Baldrati et al.) with any adapter method: stage-1 and stage-2 training modules.

Stage 1 (encoder adaptation): query ``normalize(f_img(ref) + f_txt(caption))``, target
``normalize(f_img(target))``, cross-entropy over ``100 · query @ targetsᵀ`` with the other
targets of the (per-process) batch as negatives. Reference and target images go through the
image tower in one batch.

Stage 2 (Combiner): the merged encoders are frozen; the features of every triplet are computed
once (:func:`encode_split`, :meth:`TripletFeatures.from_split`) and the Combiner trains on them with the same loss.

Validation (both stages) uses the CIRR metrics of :mod:`.metrics` on the val split
(:class:`CIRRValidation`, also behind ``mora-ret eval cirr``): the gallery is encoded once per
evaluation and the reference features are looked up in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...engine.module import TrainModule
from ...errors import DataError
from ...model.combiner import Combiner
from ...model.encode import composed_query, encode_images, encode_texts
from ...model.prefix_cache import FrozenPrefixCache
from .metrics import cirr_rankings, cirr_recalls

LOGIT_SCALE = 100.0


def contrastive_loss(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``100 · normalize(query) @ normalize(target)ᵀ`` against the diagonal."""
    logits = LOGIT_SCALE * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits.float(), torch.arange(len(logits), device=logits.device))


@dataclass
class SplitFeatures:
    """Raw features of a split: every gallery image once, and one text feature per caption."""

    gallery: torch.Tensor
    names: list[str]
    text: torch.Tensor

    def to(self, device: torch.device | str) -> "SplitFeatures":
        return SplitFeatures(self.gallery.to(device), self.names, self.text.to(device))

    def of(self, names: Sequence[str]) -> torch.Tensor:
        """Gallery features of the images ``names`` (references, targets), looked up by name."""
        index = {name: i for i, name in enumerate(self.names)}
        missing = [name for name in names if name not in index]
        if missing:
            raise DataError(f"image {missing[0]!r} has no features: it was skipped as unreadable "
                            f"({len(missing)} such lookups)")
        return self.gallery[[index[name] for name in names]]

    def keep_queries(self, records: Sequence[dict[str, Any]]) -> list[int]:
        """Positions of the triplets whose reference and target (where known) were encoded:
        with ``skip_bad_images`` an unreadable image is not in the gallery, nor is any query
        that needs it."""
        known = set(self.names)
        return [i for i, r in enumerate(records)
                if r["reference"] in known and r.get("target_hard", r["reference"]) in known]


@torch.no_grad()
def encode_split(model: nn.Module, tokenizer: Callable, gallery: Dataset, captions: Sequence[str],
                 device: torch.device, precision: str = "fp32", batch_size: int = 256,
                 num_workers: int = 0) -> SplitFeatures:
    """Encode a split's gallery (items with ``image`` and ``name``) and its captions."""
    feats, names = encode_images(model, gallery, device, precision, batch_size=batch_size, num_workers=num_workers)
    return SplitFeatures(feats, names, encode_texts(model, tokenizer, captions, device, precision))


@dataclass
class CIRRValidation:
    """A CIRR split ready for evaluation: its gallery (items with ``image`` and ``name``) and triplets."""

    gallery: Dataset
    records: list[dict[str, Any]]  # CIRRTriplets.records (no target_hard in test1)
    batch_size: int = 256
    num_workers: int = 0

    @classmethod
    def from_triplets(cls, triplets, gallery: Dataset, batch_size: int = 256, num_workers: int = 0) -> "CIRRValidation":
        return cls(gallery, list(triplets.records), batch_size, num_workers)

    @property
    def reference_names(self) -> list[str]:
        return [r["reference"] for r in self.records]

    def usable(self, feats: SplitFeatures) -> tuple["CIRRValidation", SplitFeatures]:
        """This split without the queries whose images were skipped as unreadable (see
        :meth:`SplitFeatures.keep_queries`), and their features; ``self`` when none was."""
        keep = feats.keep_queries(self.records)
        if len(keep) == len(self.records):
            return self, feats
        return (CIRRValidation(self.gallery, [self.records[i] for i in keep], self.batch_size, self.num_workers),
                SplitFeatures(feats.gallery, feats.names, feats.text[keep]))

    def encode(self, model: nn.Module, tokenizer: Callable, device: torch.device, precision: str) -> SplitFeatures:
        return encode_split(model, tokenizer, self.gallery, [r["caption"] for r in self.records], device, precision,
                            self.batch_size, self.num_workers)

    def similarity(self, feats: SplitFeatures, combiner: nn.Module | None = None) -> torch.Tensor:
        """``[queries, gallery]`` cosine similarities of the composed queries (Combiner or sum)."""
        query = composed_query(feats.of(self.reference_names), feats.text, combiner)
        return F.normalize(query, dim=-1) @ F.normalize(feats.gallery, dim=-1).T

    def metrics(self, feats: SplitFeatures, combiner: nn.Module | None = None) -> dict[str, float]:
        """The CIRR metrics (:func:`~.metrics.cirr_recalls`) of the split's usable queries."""
        split, feats = self.usable(feats)
        return cirr_recalls(split.similarity(feats, combiner), feats.names, split.reference_names,
                            [r["target_hard"] for r in split.records],
                            [list(r["img_set"]["members"]) for r in split.records])

    def rankings(self, feats: SplitFeatures, combiner: nn.Module | None = None) -> tuple[list, list]:
        """Per query: the top 50 gallery names and the top 3 subset members (:func:`~.metrics.cirr_rankings`)."""
        return cirr_rankings(self.similarity(feats, combiner), feats.names, self.reference_names,
                             [list(r["img_set"]["members"]) for r in self.records])


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
        return self.validation.metrics(self.validation.encode(self.model, self.tokenizer, device, self.precision))


class TripletFeatures(Dataset):
    """Cached stage-2 features: items ``{"reference", "text", "target"}`` (raw features)."""

    def __init__(self, reference: torch.Tensor, text: torch.Tensor, target: torch.Tensor):
        if not (len(reference) == len(text) == len(target)):
            raise ValueError("feature tensors must have the same length")
        self.reference, self.text, self.target = reference, text, target
        self.dropped = 0  # triplets left out because an image was unreadable

    def __len__(self) -> int:
        return len(self.reference)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"reference": self.reference[i], "text": self.text[i], "target": self.target[i]}

    @classmethod
    def from_split(cls, feats: SplitFeatures, records: Sequence[dict[str, Any]]) -> "TripletFeatures":
        """Per-triplet features (on the CPU) of ``encode_split(..., [r["caption"] for r in records])``;
        triplets whose images were skipped as unreadable are left out (``dropped`` counts them)."""
        keep = feats.keep_queries(records)
        kept = [records[i] for i in keep]
        out = cls(feats.of([r["reference"] for r in kept]).cpu(), feats.text[keep].cpu(),
                  feats.of([r["target_hard"] for r in kept]).cpu())
        out.dropped = len(records) - len(kept)
        return out


class CIRStage2(TrainModule):
    """Stage 2: train the Combiner on cached features of the frozen, merged encoders."""

    main_metric = "avg"
    higher_is_better = True

    def __init__(self, combiner: Combiner, validation: CIRRValidation | None = None,
                 val_split: SplitFeatures | None = None):
        super().__init__()
        self.combiner = combiner
        self.validation = validation
        self.val_split = val_split

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        query = self.combiner(batch["reference"], batch["text"])
        return contrastive_loss(query, batch["target"])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.validation is None or self.val_split is None:
            return {"avg": float("nan")}
        return self.validation.metrics(self.val_split.to(device), self.combiner)
