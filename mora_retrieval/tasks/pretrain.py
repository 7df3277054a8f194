"""Contrastive CLIP pretraining from scratch (or continued) on image–caption pairs.

The ordinary CLIP objective (open_clip's ``ClipLoss``, gathered across processes under torchrun),
all weights trainable, on a COCO-format caption set or a folder of images with sidecar ``.txt``
captions. The epoch with the best validation Recall@1 is exported as a plain open_clip checkpoint
``<run>/pretrained.safetensors`` (the demo's way to give ``mora-tiny``/``mora-small`` real weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from ..adapters import export_checkpoint
from ..data.coco import COCOCaptions
from ..data.collate import CaptionCollate
from ..data.folder import ImageCaptionFolder
from ..data.images import make_transform
from ..engine import TrainConfig, Trainer, TrainModule
from ..engine.distributed import detect
from ..errors import MoraError
from ..model.backbone import image_size_of, load_backbone
from ..model.encode import collect, ordered_loader
from ..runs import PRETRAIN_DIR, PRETRAINED_FILE, has_record, read_record, resumable, write_record
from .settings import SettingsRecord, layered, read_config_file


@dataclass
class PretrainSettings(SettingsRecord):
    """What to pretrain on what. ``coco_root`` or ``folder`` (not both)."""

    TASK = "pretrain"
    NESTED = {"train": TrainConfig}

    run_dir: str
    arch: str = "mora-tiny"
    init: str | None = None  # start from these weights (tag or file); None = from scratch
    coco_root: str | None = None
    train_split: str = "train2017"
    val_split: str | None = "val2017"
    folder: str | None = None
    val_folder: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=128, lr=1e-3,
                                                                   weight_decay=0.1))


def build_settings(run_dir: str, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> PretrainSettings:
    """The settings layers (:mod:`.settings`); an empty ``val_split`` (``--val-split ''``) skips validation."""
    merged = layered(PretrainSettings(run_dir).to_dict(), read_config_file(config_file), overrides, str(config_file))
    merged["val_split"] = merged["val_split"] or None
    return PretrainSettings.from_dict(merged, run_dir)


class ContrastivePretraining(TrainModule):
    """CLIP's contrastive objective over a batch of (image, caption) pairs."""

    main_metric = "mean_recall@1"
    higher_is_better = True

    def __init__(self, model: nn.Module, tokenizer: Callable, val_set=None, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.val_set = val_set
        self.loss = open_clip.ClipLoss(rank=rank, world_size=world_size)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        image = self.model.encode_image(batch["image"], normalize=True)
        text = self.model.encode_text(batch["tokens"], normalize=True)
        return self.loss(image, text, self.model.logit_scale.exp())

    def evaluate(self, device: torch.device) -> dict[str, float]:
        if self.val_set is None:
            return {"mean_recall@1": float("nan")}
        out = collect(ordered_loader(self.val_set, 256, device, collate_fn=CaptionCollate(self.tokenizer)),
                      lambda batch: {"image": self.model.encode_image(batch["image"].to(device), normalize=True),
                                     "text": self.model.encode_text(batch["tokens"].to(device), normalize=True),
                                     "ids": [str(i) for i in batch["image_id"]]}, device, self.precision)
        return caption_retrieval_recall(out["image"].float(), out["text"].float(), out["ids"])


def caption_retrieval_recall(image: torch.Tensor, text: torch.Tensor, image_ids: list[str]) -> dict[str, float]:
    """Recall@1 (percent) of text→image and image→text over pairs; several captions may share an image.

    Images are de-duplicated by id; a text→image hit is its own image ranked first, an
    image→text hit is any of its captions ranked first.
    """
    first: dict[str, int] = {}  # each image's first caption
    for i, image_id in enumerate(image_ids):
        first.setdefault(image_id, i)
    column = {image_id: c for c, image_id in enumerate(first)}
    gallery = image[list(first.values())]
    owner = torch.tensor([column[i] for i in image_ids], device=text.device)
    sim = text @ gallery.T  # [captions, images]
    t2i = (sim.argmax(dim=1) == owner).float().mean().item() * 100
    i2t = (owner[sim.argmax(dim=0)] == torch.arange(len(first), device=text.device)).float().mean().item() * 100
    return {"t2i_recall@1": t2i, "i2t_recall@1": i2t, "mean_recall@1": (t2i + i2t) / 2}


def is_pretrained(run_dir: str | Path, settings: PretrainSettings) -> bool:
    """Whether ``run_dir`` already holds a finished pretraining with these settings."""
    run_dir = Path(run_dir)
    return (run_dir / PRETRAINED_FILE).is_file() and has_record(run_dir) and read_record(run_dir) == settings.to_dict()


def pretrain(settings: PretrainSettings, resume: bool = False, console=None, quiet: bool = False) -> dict[str, Any]:
    """Train, export ``pretrained.safetensors`` of the best epoch, and return a summary."""
    if (settings.coco_root is None) == (settings.folder is None):
        raise MoraError("pretraining needs exactly one source: --coco-root DIR or --folder DIR")
    run_dir = Path(settings.run_dir)
    engine_dir = run_dir / PRETRAIN_DIR
    info = detect()
    backbone = load_backbone(settings.arch, settings.init)
    model = backbone.model
    model.requires_grad_(True)
    transform = make_transform("clip", image_size_of(model))
    if settings.coco_root is not None:
        train_set = COCOCaptions(settings.coco_root, settings.train_split, transform)
        val_set = COCOCaptions(settings.coco_root, settings.val_split, transform) if settings.val_split else None
    else:
        train_set = ImageCaptionFolder(settings.folder, transform)
        val_set = ImageCaptionFolder(settings.val_folder, transform) if settings.val_folder else None
    module = ContrastivePretraining(model, backbone.tokenizer, val_set, info.rank, info.world_size)
    trainer = Trainer(module, settings.train, engine_dir, train_set, CaptionCollate(backbone.tokenizer),
                      console=console, quiet=quiet, extra_config={"arch": settings.arch, "init": settings.init})
    result = trainer.fit(resume=resumable(engine_dir, resume))
    trainer.restore_best()
    if info.is_main:
        export_checkpoint(model, run_dir / PRETRAINED_FILE)
        write_record(run_dir, settings.to_dict())
    best = result.history[result.best_epoch - 1]["val"] if result.best_epoch else {}
    return {"checkpoint": str(run_dir / PRETRAINED_FILE), "best_epoch": result.best_epoch, "val": best,
            "pairs": len(train_set)}
