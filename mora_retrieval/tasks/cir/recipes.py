"""``train_cirr``: the whole CLIP4CIR + adapter recipe, from a CIRR root to a run folder; ``evaluate_cirr_run``.

The run folder (:mod:`mora_retrieval.runs`): ``config.json`` (the :class:`CIRSettings`), the engine
runs ``stage1/`` (encoder adaptation) and ``stage2/`` (the Combiner, on features cached once), the
best stage-1 ``adapter/``, ``merged.safetensors``, ``combiner.safetensors`` and ``results.json``
(CIRR val metrics: stage 1 with summed features, and with the Combiner).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...adapters import add_adapters, export_checkpoint, get_method, merge_adapters, save_adapters, trainable_share
from ...data.cirr import CIRRGallery, CIRRTriplets
from ...data.images import make_transform, preprocess_spec
from ...device import resolve_device, resolve_precision
from ...engine import Trainer, seed_everything
from ...engine.distributed import barrier, process_group
from ...errors import TrainingError
from ...fileio import check_can_create, write_json
from ...model.backbone import load_backbone
from ...model.combiner import Combiner, load_combiner, save_combiner
from ...runs import (ADAPTER_DIR, COMBINER_FILE, MERGED_FILE, RESULTS_FILE, STAGE1_DIR, STAGE2_DIR, FinishedRun,
                     has_record, read_record, resumable, write_record, write_results)
from ...engine.config import TRAINING_FIELDS
from ..settings import differences
from .inputs import cir_inputs
from .metrics import cirr_rankings, submission_files
from .settings import CIRSettings
from .stages import CIRRValidation, CIRStage1, CIRStage2, encode_split, triplet_features


#: Settings a resumed run must keep; the others (data root, workers, device, …) may change.
RESUME_KEYS = ("arch", "pretrained", "adapter", "stage1", "transform")


def _check_resume(run_dir: Path, settings: CIRSettings) -> None:
    """Name the first setting that a resume may not change, with both values."""
    for path, old, new in differences(read_record(run_dir), settings.to_dict(), RESUME_KEYS):
        free = path.startswith("stage1.") and path.split(".", 1)[1] not in TRAINING_FIELDS  # workers, device, …
        if not free:
            raise TrainingError(f"{run_dir}: cannot resume: {path} was {old!r}, now {new!r} "
                                f"(start a new --run-dir to change it)")


def train_cirr(settings: CIRSettings, resume: bool = False, console=None, quiet: bool = False) -> dict[str, Any]:
    """Train stage 1 (and stage 2 unless ``settings.stage2`` is None); return the results dict.
    Under ``torchrun`` every rank runs this, in one process group for both stages; only rank 0 writes files."""
    if not get_method(settings.adapter.method).mergeable:
        raise TrainingError(f"train cirr: {settings.adapter.method} is a prompt baseline of the classification tables "
                            f"and cannot be merged, but a CIR run exports a merged encoder; use mora, lora, dora, "
                            f"bitfit, full or a MoRA ablation")
    with process_group(settings.stage1.device) as info:
        run_dir = Path(settings.run_dir)
        main = info.is_main
        check_can_create(run_dir, "run folder")
        if resume and has_record(run_dir):
            _check_resume(run_dir, settings)
        elif has_record(run_dir) and resumable(run_dir / STAGE1_DIR, True):  # a stage-1 checkpoint to lose
            raise TrainingError(f"{run_dir}: already holds a run; pass --resume to continue it or choose a new "
                                "--run-dir")
        # Everything else that can be checked is checked before the run folder is written: the data,
        # the weights, and both stages' batch sizes against the data (a failed start blocks no retry).
        seed_everything(settings.stage1.seed)  # random weights (if any) and adapter init follow the run's seed
        backbone = load_backbone(settings.arch, settings.pretrained)
        model = add_adapters(backbone.model, settings.adapter)
        trainable, total, share = trainable_share(model)
        spec = preprocess_spec(model, settings.transform)
        inputs = cir_inputs(settings.data_root, spec, backbone.tokenizer, prepared=settings.prepared,
                            prepared_dir=settings.prepared_dir, skip_bad_images=settings.skip_bad_images,
                            workers=settings.stage1.num_workers)
        settings.stage1.check_fits(len(inputs.train), f"{settings.data_root}: CIRR train split", info.world_size)
        if settings.stage2 is not None:
            settings.stage2.check_fits(len(inputs.train), f"{settings.data_root}: CIRR train split (Combiner)",
                                       info.world_size)
        barrier(info)  # every rank has checked the folder before rank 0 writes into it
        if main:
            write_record(run_dir, settings.to_dict())
        if any(inputs.dropped.values()) and console is not None and not quiet:
            console.print("[yellow]left out for bad images: "
                          + ", ".join(f"{n} {split} triplet(s)" for split, n in inputs.dropped.items()) + "[/]")
        validation = CIRRValidation(inputs.val_gallery, inputs.val_records, settings.eval_batch_size)
        module = CIRStage1(model, backbone.tokenizer, validation, pixel_spec=spec)
        extra = {"task": "cir-stage1", "arch": settings.arch, "pretrained": settings.pretrained,
                 "adapter": settings.adapter.to_dict()}
        trainer = Trainer(module, settings.stage1, run_dir / STAGE1_DIR, inputs.train, inputs.collate,
                          console=console, quiet=quiet, extra_config=extra)
        validation.num_workers = trainer.num_workers  # as resolved by the engine
        if settings.cache_frozen:  # dense prefix caches over the training images and captions
            gallery = inputs.train_gallery
            rows, names = (len(gallery.prepared), None) if settings.prepared else (len(gallery.names), gallery.names)
            # With the prepared cache and one process, batches stop carrying pixels once every image is cached
            # (under DDP each rank fills only the rows it sees, and the sampler gives it other rows every epoch).
            stop = None
            if settings.prepared and not info.enabled:
                stop = (inputs.collate.read_pixels, inputs.train.needed_rows)
            cached = module.enable_prefix_cache(trainer.device, rows, len(inputs.train), names, stop_reading=stop)
            if not cached and console is not None and not quiet:
                console.print("[yellow]--cache-frozen: no frozen leading blocks to cache with this adapter method[/]")
        elif trainer.precision == "bf16":
            module.enable_bf16_prefix()  # the frozen leading blocks in pure bf16
        stage1 = trainer.fit(resume=resumable(run_dir / STAGE1_DIR, resume))
        device, precision = trainer.device, trainer.precision
        trainer.restore_best()
        if main:
            save_adapters(model, run_dir / ADAPTER_DIR, arch=settings.arch,
                          extra={"pretrained": settings.pretrained, "task": "cir"})
        merged = merge_adapters(model).eval().to(device)
        if main:
            export_checkpoint(merged, run_dir / MERGED_FILE)
        merged.requires_grad_(False)

        results: dict[str, Any] = {
            "arch": settings.arch,
            "method": settings.adapter.method,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_percent": share,
            "stage1_best_epoch": stage1.best_epoch,
            "dropped_triplets": dict(inputs.dropped),
        }
        # encoded once: the stage-1 score and stage 2's validation data
        val_split = validation.encode(merged, backbone.tokenizer, device, precision)
        results["val_stage1"] = validation.metrics(val_split)
        if not settings.prepared:  # image files: a bad image shows as a gallery image that was not encoded
            results["dropped_triplets"]["val"] = len(inputs.val_records) - len(validation.usable(val_split)[0].records)

        if settings.stage2 is not None:
            train_split = encode_split(merged, backbone.tokenizer, inputs.train_gallery,
                                       [r["caption"] for r in inputs.train.records], device, precision,
                                       settings.eval_batch_size, trainer.num_workers)
            train_feats, dropped = triplet_features(train_split, inputs.train.records)
            if not settings.prepared:
                results["dropped_triplets"]["train"] = dropped  # stage 1's batches dropped them too
            if console is not None and not quiet:
                console.rule(f"stage 2: the Combiner on cached features of {len(train_feats)} triplets")
            combiner = Combiner(train_feats.tensors[0].shape[1])
            stage2_module = CIRStage2(combiner, validation, val_split.to("cpu"))
            trainer2 = Trainer(stage2_module, settings.stage2, run_dir / STAGE2_DIR, train_feats, console=console,
                               quiet=quiet, extra_config={"task": "cir-stage2", "adapter_fingerprint": None})
            stage2 = trainer2.fit(resume=resumable(run_dir / STAGE2_DIR, resume))
            trainer2.restore_best()
            combiner.eval()
            if main:
                save_combiner(combiner.cpu(), run_dir / COMBINER_FILE)
            combiner.to(device)
            with torch.no_grad():
                results["val_combiner"] = stage2_module.evaluate(device)
            results["stage2_best_epoch"] = stage2.best_epoch
        if main:
            write_results(run_dir / RESULTS_FILE, results)
        return results


def evaluate_cirr_run(run_dir: str | Path, data_root: str | None = None, split: str = "val",
                      out_dir: str | Path | None = None, device: str | None = None,
                      use_combiner: bool = True) -> dict[str, Any]:
    """Evaluate a finished run's merged model (and Combiner) on CIRR ``val``, or export ``test1`` (no targets):
    the CIRR server's two submission files, written into ``out_dir`` (default: the run folder)."""
    run = FinishedRun.open(run_dir, TrainingError, tasks=("cir",),
                           needs="eval cirr needs a folder written by `mora-ret train cirr`")
    settings = CIRSettings.from_run(run, run_dir=str(run_dir))
    dev = resolve_device(device)
    backbone = run.load_model(str(dev))
    model = backbone.model.eval()
    combiner_path = run.find(COMBINER_FILE) if use_combiner else None
    combiner = load_combiner(combiner_path, str(dev)) if combiner_path is not None else None
    root = data_root or settings.data_root
    transform = make_transform(preprocess_spec(model, settings.transform))
    triplets = CIRRTriplets(root, split, transform=transform)
    validation = CIRRValidation(CIRRGallery(root, split, transform=transform), list(triplets.records),
                                settings.eval_batch_size)
    feats = validation.encode(model, backbone.tokenizer, dev, resolve_precision("auto", dev))
    with torch.no_grad():
        if split != "test1":
            return {"split": split, "combiner": combiner is not None, **validation.metrics(feats, combiner)}
        full, subset = cirr_rankings(validation.similarity(feats, combiner), feats.names, validation.reference_names,
                                     [list(r["img_set"]["members"]) for r in validation.records])
    recall, recall_subset = submission_files([r["pairid"] for r in validation.records], full, subset)
    out = Path(out_dir or run_dir)
    write_json(out / "recall_submission.json", recall)
    write_json(out / "recall_subset_submission.json", recall_subset)
    return {"split": split, "combiner": combiner is not None, "queries": len(validation.records),
            "files": [str(out / "recall_submission.json"), str(out / "recall_subset_submission.json")]}
