"""``train_cirr``: the whole CLIP4CIR + adapter recipe, from a CIRR root to a run folder.

Run folder::

    config.json            task, arch, pretrained, data root, adapter and both stages' settings
    stage1/                engine run of the encoder adaptation (config.json, metrics.jsonl,
                           curves.png, checkpoints/last.pt + best.safetensors)
    adapter/               the best stage-1 adapter (METHOD.md §7)
    merged.safetensors     the plain open_clip checkpoint with the adapter folded in
    stage2/                engine run of the Combiner (features cached once)
    combiner.safetensors   the best Combiner
    results.json           CIRR val metrics: stage 1 (summed features) and with the Combiner

Defaults (METHOD.md §1, §4): MoRA and the other adapters use the CIRR row (r = r_s = 4, α 0.01,
q and v of the last 2 blocks, lr 1e-2, weight decay 0.02, batch 256, 20 epochs); ``full`` (the
CLIP4CIR baseline) uses lr 2e-6, batch 128, weight decay 0.01. The Combiner: Adam (AdamW with
no weight decay) at lr 2e-5, batch 512, 20 epochs, ``p = 4d``, ``h = 8d``. All may be overridden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import AdapterConfig, add_adapters, export_checkpoint, get_method, merge_adapters, save_adapters, trainable_share
from ..device import resolve_device
from ..engine import TrainConfig
from ..errors import TrainingError
from ..fileio import read_json, write_json

RUN_CONFIG = "config.json"


def cir_defaults(method: str) -> tuple[AdapterConfig, TrainConfig, TrainConfig]:
    """Adapter, stage-1 and stage-2 defaults for ``method`` (see the module docstring)."""
    adapter = AdapterConfig(method=method, r=4, r_shared=4, alpha=get_method(method).default_alpha,
                            targets=("q", "v"), layers=2)
    if method == "full":
        stage1 = TrainConfig(epochs=20, batch_size=128, lr=2e-6, weight_decay=0.01)
    else:
        stage1 = TrainConfig(epochs=20, batch_size=256, lr=1e-2, weight_decay=0.02)
    stage2 = TrainConfig(epochs=20, batch_size=512, lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999))
    return adapter, stage1, stage2


@dataclass
class CIRSettings:
    """Everything ``train_cirr`` needs; ``stage2=None`` skips the Combiner."""

    data_root: str
    run_dir: str
    arch: str = "ViT-B-16"
    pretrained: str | None = "openai"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig | None = None
    transform: str = "targetpad"
    skip_bad_images: bool = False
    eval_batch_size: int = 256
    cache_frozen: bool = False  # cache the frozen blocks' outputs across epochs (deterministic inputs)

    @classmethod
    def with_defaults(cls, data_root: str, run_dir: str, method: str = "mora", **overrides: Any) -> "CIRSettings":
        adapter, stage1, stage2 = cir_defaults(method)
        return cls(data_root=data_root, run_dir=run_dir, adapter=adapter, stage1=stage1, stage2=stage2, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "cir",
            "arch": self.arch,
            "pretrained": self.pretrained,
            "data_root": str(self.data_root),
            "transform": self.transform,
            "skip_bad_images": self.skip_bad_images,
            "eval_batch_size": self.eval_batch_size,
            "cache_frozen": self.cache_frozen,
            "adapter": self.adapter.to_dict(),
            "stage1": self.stage1.to_dict(),
            "stage2": None if self.stage2 is None else self.stage2.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_dir: str | None = None) -> "CIRSettings":
        return cls(
            data_root=data["data_root"],
            run_dir=run_dir or data.get("run_dir", "."),
            arch=data["arch"],
            pretrained=data.get("pretrained"),
            adapter=AdapterConfig.from_dict(data["adapter"]),
            stage1=TrainConfig.from_dict(data["stage1"]),
            stage2=None if data.get("stage2") is None else TrainConfig.from_dict(data["stage2"]),
            transform=data.get("transform", "targetpad"),
            skip_bad_images=data.get("skip_bad_images", False),
            eval_batch_size=data.get("eval_batch_size", 256),
            cache_frozen=data.get("cache_frozen", False),
        )


def _datasets(settings: CIRSettings, image_size: int):
    from ..data.cirr import CIRRGallery, CIRRTriplets
    from ..data.images import make_transform

    transform = make_transform(settings.transform, image_size)
    kw = {"transform": transform, "skip_bad_images": settings.skip_bad_images}
    return (CIRRTriplets(settings.data_root, "train", **kw), CIRRTriplets(settings.data_root, "val", **kw),
            CIRRGallery(settings.data_root, "train", **kw), CIRRGallery(settings.data_root, "val", **kw))


def _check_resume(run_dir: Path, settings: CIRSettings) -> None:
    saved = read_json(run_dir / RUN_CONFIG, "run config")
    ours = settings.to_dict()
    changed = [k for k in ("arch", "pretrained", "adapter", "stage1", "transform") if saved.get(k) != ours.get(k)]
    if changed:
        raise TrainingError(f"{run_dir / RUN_CONFIG}: cannot resume, the run was started with other {', '.join(changed)}")


def _fit(trainer, run_dir: Path, resume: bool):
    from ..engine.checkpoint import last_path

    return trainer.fit(resume=resume and last_path(run_dir).exists())


def train_cirr(settings: CIRSettings, resume: bool = False, console=None, quiet: bool = False) -> dict[str, Any]:
    """Train stage 1 (and stage 2 unless ``settings.stage2`` is None); return the results dict.

    Under ``torchrun`` every rank runs this; both stages share one process group, only rank 0
    writes files.
    """
    from ..engine.distributed import process_group

    if not get_method(settings.adapter.method).mergeable:
        raise TrainingError(f"train cirr: {settings.adapter.method} is a prompt baseline of the classification tables "
                            f"and cannot be merged, but a CIR run exports a merged encoder; use mora, lora, dora, "
                            f"bitfit, full or a MoRA ablation")
    with process_group(settings.stage1.device):
        return _train_cirr(settings, resume, console, quiet)


def _train_cirr(settings: CIRSettings, resume: bool, console, quiet: bool) -> dict[str, Any]:
    from ..backbone import image_size_of, load_backbone
    from ..engine import Trainer
    from ..engine.checkpoint import load_best
    from ..engine.distributed import barrier, detect
    from .cir import (CaptionCollate, CIRRValidation, CIRStage1, CIRStage2, TripletFeatures, composed_query,
                      encode_split)
    from .combiner import Combiner, save_combiner

    run_dir = Path(settings.run_dir)
    info = detect()
    main = info.is_main
    if resume and (run_dir / RUN_CONFIG).exists():
        _check_resume(run_dir, settings)
    elif (run_dir / RUN_CONFIG).exists() and not resume:
        raise TrainingError(f"{run_dir}: already holds a run; pass --resume to continue it or choose a new --run-dir")
    barrier(info)  # every rank has checked the folder before rank 0 writes into it
    if main:
        write_json(run_dir / RUN_CONFIG, settings.to_dict())

    from ..engine.rng import seed_everything

    seed_everything(settings.stage1.seed)  # random weights (if any) and adapter init follow the run's seed
    backbone = load_backbone(settings.arch, settings.pretrained)
    model = add_adapters(backbone.model, settings.adapter)
    trainable, total, share = trainable_share(model)
    train_set, val_set, train_gallery, val_gallery = _datasets(settings, image_size_of(model))
    validation = CIRRValidation.from_triplets(val_set, val_gallery, settings.eval_batch_size)
    module = CIRStage1(model, backbone.tokenizer, validation)
    extra = {"task": "cir-stage1", "arch": settings.arch, "pretrained": settings.pretrained,
             "adapter": settings.adapter.to_dict()}
    trainer = Trainer(module, settings.stage1, run_dir / "stage1", train_set, CaptionCollate(backbone.tokenizer),
                      console=console, quiet=quiet, extra_config=extra)
    module.precision = trainer.precision
    validation.num_workers = trainer.num_workers
    if settings.cache_frozen and not module.enable_prefix_cache(trainer.device) and console is not None and not quiet:
        console.print("[yellow]--cache-frozen: no frozen leading blocks to cache with this adapter method[/]")
    stage1 = _fit(trainer, run_dir / "stage1", resume)
    device, precision = trainer.device, trainer.precision

    module.load_trainable_state_dict(load_best(run_dir / "stage1"))
    if main:
        save_adapters(model, run_dir / "adapter", arch=settings.arch,
                      extra={"pretrained": settings.pretrained, "task": "cir"})
    merged = merge_adapters(model).eval().to(device)
    if main:
        export_checkpoint(merged, run_dir / "merged.safetensors")
    for param in merged.parameters():
        param.requires_grad_(False)

    results: dict[str, Any] = {
        "arch": settings.arch,
        "method": settings.adapter.method,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": share,
        "stage1_best_epoch": stage1.best_epoch,
    }
    val_split = validation.encode(merged, backbone.tokenizer, device, precision)  # once: stage-1 score, stage-2 data
    query = composed_query(val_split.of(validation.reference_names), val_split.text)
    results["val_stage1"] = validation.metrics(query, val_split.gallery, val_split.names)

    if settings.stage2 is not None:
        train_split = encode_split(merged, backbone.tokenizer, train_gallery, [r["caption"] for r in train_set.records],
                                   device, precision, settings.eval_batch_size, trainer.num_workers)
        train_feats = TripletFeatures.from_split(train_split, train_set.records)
        val_feats = TripletFeatures.from_split(val_split, val_set.records)
        gallery = (val_split.gallery.cpu(), val_split.names)
        combiner = Combiner(train_feats.reference.shape[1])
        stage2_module = CIRStage2(combiner, val_feats, validation, gallery)
        trainer2 = Trainer(stage2_module, settings.stage2, run_dir / "stage2", train_feats, console=console,
                           quiet=quiet, extra_config={"task": "cir-stage2", "adapter_fingerprint": None})
        stage2 = _fit(trainer2, run_dir / "stage2", resume)
        stage2_module.load_trainable_state_dict(load_best(run_dir / "stage2"))
        combiner.eval()
        if main:
            save_combiner(combiner.cpu(), run_dir / "combiner.safetensors")
        combiner.to(device)
        with torch.no_grad():
            results["val_combiner"] = stage2_module.evaluate(device)
        results["stage2_best_epoch"] = stage2.best_epoch
    if main:
        write_json(run_dir / "results.json", _finite(results))
    return results


def _finite(obj: Any) -> Any:
    """JSON has no NaN: turn non-finite floats into None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def evaluate_cirr_run(run_dir: str | Path, data_root: str | None = None, split: str = "val",
                      out_dir: str | Path | None = None, device: str | None = None,
                      use_combiner: bool = True) -> dict[str, Any]:
    """Evaluate a finished run's merged model (and Combiner) on CIRR ``val``, or export ``test1``.

    For ``test1`` (no targets) writes ``recall_submission.json`` and
    ``recall_subset_submission.json`` (the CIRR server's format) into ``out_dir`` (default: the
    run folder) and returns their paths.
    """
    from ..backbone import image_size_of, load_backbone
    from ..data.cirr import CIRRGallery, CIRRTriplets
    from ..data.images import make_transform
    from ..errors import MoraError
    from .cir import composed_query, encode_split
    from .cirr_metrics import cirr_rankings, cirr_recalls, submission_files
    from .combiner import load_combiner

    run_dir = Path(run_dir)
    settings = CIRSettings.from_dict(read_json(run_dir / RUN_CONFIG, "run config"), str(run_dir))
    merged_path = run_dir / "merged.safetensors"
    if not merged_path.is_file():
        raise MoraError(f"{merged_path}: merged checkpoint not found (did training finish?)")
    dev = resolve_device(device)
    precision = "bf16" if dev.type == "cuda" else "fp32"
    backbone = load_backbone(settings.arch, str(merged_path), device=str(dev))
    model = backbone.model.eval()
    combiner_path = run_dir / "combiner.safetensors"
    combiner = load_combiner(combiner_path, str(dev)) if use_combiner and combiner_path.is_file() else None
    root = data_root or settings.data_root
    transform = make_transform(settings.transform, image_size_of(model))
    triplets = CIRRTriplets(root, split, transform=transform)
    gallery_set = CIRRGallery(root, split, transform=transform)
    recs = triplets.records
    with torch.no_grad():
        feats = encode_split(model, backbone.tokenizer, gallery_set, [r["caption"] for r in recs], dev, precision,
                             settings.eval_batch_size)
        query = composed_query(feats.of([r["reference"] for r in recs]), feats.text, combiner).float()
    names = feats.names
    sim = query.cpu() @ torch.nn.functional.normalize(feats.gallery, dim=-1).cpu().T
    members = [list(r["img_set"]["members"]) for r in recs]
    refs = [r["reference"] for r in recs]
    if split != "test1":
        metrics = cirr_recalls(sim, names, refs, [r["target_hard"] for r in recs], members)
        return {"split": split, "combiner": combiner is not None, **metrics}
    full, subset = cirr_rankings(sim, names, refs, members)
    recall, recall_subset = submission_files([r["pairid"] for r in recs], full, subset)
    out = Path(out_dir or run_dir)
    write_json(out / "recall_submission.json", recall)
    write_json(out / "recall_subset_submission.json", recall_subset)
    return {"split": split, "combiner": combiner is not None, "queries": len(recs),
            "files": [str(out / "recall_submission.json"), str(out / "recall_subset_submission.json")]}


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file with any subset of the run config's keys (``arch``, ``adapter``, ``stage1``…)."""
    import tomllib

    from ..errors import MoraError

    path = Path(path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise MoraError(f"{path}: config file not found")
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise MoraError(f"{path}: not valid TOML ({exc})") from None
    data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise MoraError(f"{path}: expected a JSON object of settings")
    return data


def build_settings(data_root: str, run_dir: str, method: str = "mora", config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, resume: bool = False) -> CIRSettings:
    """Defaults for ``method`` ← the config file ← command-line ``overrides`` (nested dict, None = unset).

    With ``resume`` and an existing run, the run's own config is the base instead of the defaults.
    """
    existing = Path(run_dir) / RUN_CONFIG
    if resume and existing.is_file():
        merged = read_json(existing, "run config")
    else:
        merged = CIRSettings.with_defaults(data_root, run_dir, method).to_dict()
        merged["data_root"] = data_root
    if config_file is not None:
        _deep_update(merged, read_config_file(config_file))
    if overrides:
        _deep_update(merged, _drop_none(overrides))
    no_combiner = merged.pop("no_combiner", False)
    if no_combiner:
        merged["stage2"] = None
    return CIRSettings.from_dict(merged, run_dir)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out
