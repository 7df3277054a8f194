"""CLIP4CIR (Baldrati et al.) with any adapter method: stage-1 and stage-2 training modules.

Stage 1 (encoder adaptation): query ``normalize(f_img(ref) + f_txt(caption))``, target
``normalize(f_img(target))``, cross-entropy over ``100 · query @ targetsᵀ`` with the other
targets of the (per-process) batch as negatives. Stage 2: the Combiner, with the same loss, on
the features of the frozen merged encoders, computed once. Validation (:class:`CIRRValidation`)
encodes the gallery once and looks the reference features up in it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ...data.images import PreprocessSpec, normalize_uint8
from ...engine.module import TrainModule
from ...errors import DataError
from ...model.combiner import Combiner
from ...model.encode import collect, composed_query, encode_images, encode_texts, ordered_loader
from ...model.bf16_prefix import Bf16Prefix
from ...model.prefix_cache import FrozenPrefixCache
from .inputs import PreparedGallery, usable_positions
from .metrics import cirr_recalls

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


def encode_split(model: nn.Module, tokenizer: Callable, gallery: Dataset, captions: Sequence[str],
                 device: torch.device, precision: str = "fp32", batch_size: int = 256,
                 num_workers: int = 0) -> SplitFeatures:
    """Encode a split's gallery (items with ``image`` and ``name``, or a :class:`PreparedGallery`) and its captions."""
    if isinstance(gallery, PreparedGallery):
        prepared = gallery.prepared
        out = collect(ordered_loader(gallery, batch_size, device, num_workers, collate_fn=gallery.collate),
                      lambda batch: {"features": model.encode_image(prepared.normalize(batch["pixels"], device=device))
                                     .float(), "ids": list(batch["name"])}, device, precision)
        if not out:
            raise ValueError("no image to encode (every image of the gallery is bad)")
        feats, names = out["features"], out["ids"]
    else:
        feats, names = encode_images(model, gallery, device, precision, batch_size=batch_size,
                                     num_workers=num_workers)
    return SplitFeatures(feats, names, encode_texts(model, tokenizer, captions, device, precision))


@dataclass
class CIRRValidation:
    """A CIRR split ready for evaluation: its gallery and triplets."""

    gallery: Dataset
    records: list[dict[str, Any]]  # CIRRTriplets.records (no target_hard in test1)
    batch_size: int = 256
    num_workers: int = 0

    @property
    def reference_names(self) -> list[str]:
        return [r["reference"] for r in self.records]

    def usable(self, feats: SplitFeatures) -> tuple["CIRRValidation", SplitFeatures]:
        """This split and its features without the queries whose images were skipped as unreadable."""
        keep = usable_positions(self.records, set(feats.names))
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
        """The CIRR metrics of the split's usable queries."""
        split, feats = self.usable(feats)
        return cirr_recalls(split.similarity(feats, combiner), feats.names, split.reference_names,
                            [r["target_hard"] for r in split.records],
                            [list(r["img_set"]["members"]) for r in split.records])


class CIRStage1(TrainModule):
    """Stage 1: adapt the encoders (adapters already injected into ``model``). A batch carries normalised
    ``reference`` and ``target`` images, or the prepared cache's uint8 ``pixels``, normalised here with
    ``pixel_spec`` in float32 (the model then runs under the engine's autocast)."""

    main_metric = "avg"
    higher_is_better = True

    def __init__(self, model: nn.Module, tokenizer: Callable, validation: CIRRValidation | None,
                 pixel_spec: PreprocessSpec | None = None):
        super().__init__()
        self.model = model
        self.pixel_spec = pixel_spec
        self.tokenizer = tokenizer
        self.validation = validation
        self.prefix_caches = None
        self._row_of: dict[str, int] | None = None
        self._stop_reading: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bf16_prefixes: tuple[Bf16Prefix, Bf16Prefix] | None = None

    def enable_prefix_cache(self, device: str | torch.device = "cpu", image_rows: int = 0, text_rows: int = 0,
                            image_names: Sequence[str] | None = None,
                            stop_reading: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """Cache the frozen leading blocks' outputs per image row and per caption (triplet index) across
        epochs (:class:`~mora_retrieval.model.prefix_cache.FrozenPrefixCache`); deterministic inputs only.

        Batches of image files carry names, mapped to rows by their position in ``image_names``.
        ``stop_reading`` = ``(read_pixels, needed_rows)``: the shared flag is cleared once the image cache
        holds every needed row. Returns whether any tower has a frozen prefix.
        """
        caches = (FrozenPrefixCache(self.model.visual.transformer, image_rows, device),
                  FrozenPrefixCache(self.model.transformer, text_rows, device))
        self.prefix_caches = caches if any(c.active for c in caches) else None
        self._row_of = None if image_names is None else {name: i for i, name in enumerate(image_names)}
        self._stop_reading = stop_reading
        return self.prefix_caches is not None

    def enable_bf16_prefix(self) -> bool:
        """Run the frozen leading blocks of both towers from bf16 copies with autocast off (bf16 precision;
        not with the prefix cache, which skips those blocks anyway). Returns whether any tower has one."""
        prefixes = (Bf16Prefix(self.model.visual.transformer), Bf16Prefix(self.model.transformer))
        self.bf16_prefixes = prefixes if any(p.usable for p in prefixes) else None
        return self.bf16_prefixes is not None

    def images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's references then targets, normalised; zeros when the batch comes without pixels
        (every image's prefix is cached, the stem's output is unused)."""
        if "reference" in batch:
            return torch.cat([batch["reference"], batch["target"]])
        if self.pixel_spec is None:
            raise ValueError("CIRStage1 got prepared-cache batches but no pixel_spec")
        if "pixels" not in batch:
            n = 2 * len(batch["reference_row"])
            return torch.zeros(n, 3, *self.pixel_spec.size, device=batch["reference_row"].device)
        return normalize_uint8(batch["pixels"], self.pixel_spec.mean, self.pixel_spec.std)

    def image_rows(self, batch: dict[str, Any]) -> torch.Tensor:
        """The cache rows of the batch's images (references then targets)."""
        if "reference_row" in batch:
            return torch.cat([batch["reference_row"], batch["target_row"]])
        if self._row_of is None:
            raise ValueError("image batches without rows need enable_prefix_cache(image_names=...)")
        names = list(batch["reference_name"]) + list(batch["target_name"])
        return torch.tensor([self._row_of[name] for name in names], dtype=torch.int64)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        images = self.images(batch)
        n = images.shape[0] // 2
        if self.prefix_caches is None:
            with contextlib.ExitStack() as stack:
                for prefix in self.bf16_prefixes or ():
                    stack.enter_context(prefix.active())
                features = self.model.encode_image(images)
                text = self.model.encode_text(batch["tokens"])
        else:
            image_cache, text_cache = self.prefix_caches
            rows = self.image_rows(batch)
            if "pixels" not in batch and "reference" not in batch and not image_cache.covers(rows.cpu()):
                raise RuntimeError("a batch without pixels has images whose frozen prefix is not cached")
            features = image_cache.encode(self.model.encode_image, images, rows)
            text = text_cache.encode(self.model.encode_text, batch["tokens"], batch["index"])
            if self._stop_reading is not None:
                read_pixels, needed_rows = self._stop_reading
                if bool(read_pixels) and image_cache.covers(needed_rows):
                    read_pixels.fill_(False)
        return contrastive_loss(features[:n] + text, features[n:])

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.validation is None:
            return {"avg": float("nan")}
        return self.validation.metrics(self.validation.encode(self.model, self.tokenizer, device, self.precision))


def triplet_features(feats: SplitFeatures, records: Sequence[dict[str, Any]]) -> tuple[TensorDataset, int]:
    """Stage 2's training set, the raw ``(reference, text, target)`` features (on the CPU) of the triplets
    ``records`` (``feats.text`` holds their captions'); and how many were left out for unreadable images."""
    keep = usable_positions(records, set(feats.names))
    kept = [records[i] for i in keep]
    data = TensorDataset(feats.of([r["reference"] for r in kept]).cpu(), feats.text[keep].cpu(),
                         feats.of([r["target_hard"] for r in kept]).cpu())
    return data, len(records) - len(kept)


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

    def forward(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """The loss of a batch of :func:`triplet_features`: ``(reference, text, target)``."""
        reference, text, target = batch
        return contrastive_loss(self.combiner(reference, text), target)

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.validation is None or self.val_split is None:
            return {"avg": float("nan")}
        return self.validation.metrics(self.val_split.to(device), self.combiner)
