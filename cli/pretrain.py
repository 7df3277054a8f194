"""``mora-ret pretrain``: contrastive CLIP training on a COCO-format caption set or a captioned folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .options import (CONFIG_OPTION, MODEL_SETTINGS, RESUME_OPTION, TRAINING_DEFAULTS, TRAINING_SETTINGS, make_console,
                      with_settings)

PRETRAIN_DEFAULTS = {"model": "mora-tiny", "epochs": "10", "batch_size": "128", "lr": "1e-3", "weight_decay": "0.1",
                     **TRAINING_DEFAULTS}


@with_settings(MODEL_SETTINGS[:1] + TRAINING_SETTINGS, PRETRAIN_DEFAULTS)
def pretrain_command(
    run_dir: Path = typer.Option(Path("runs/pretrain"), "--run-dir", help="Run folder."),
    config: Optional[Path] = CONFIG_OPTION,
    init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (tag or file); default: scratch."),
    coco_root: Optional[Path] = typer.Option(None, "--coco-root", help="COCO-format root (annotations/captions_*.json)."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="[default: train2017]"),
    val_split: Optional[str] = typer.Option(None, "--val-split", help="'' to skip validation.  [default: val2017]"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="Folder of images with sidecar .txt captions."),
    val_folder: Optional[Path] = typer.Option(None, "--val-folder"),
    resume: bool = RESUME_OPTION,
    overrides: dict[str, Any] = None,
) -> None:
    """Pretrain CLIP contrastively; writes RUN_DIR/pretrained.safetensors (a plain open_clip checkpoint)."""
    from mora_retrieval.tasks.pretrain import build_settings, pretrain

    overrides.update({"init": init, "coco_root": None if coco_root is None else str(coco_root),
                      "train_split": train_split, "val_split": val_split,
                      "folder": None if folder is None else str(folder),
                      "val_folder": None if val_folder is None else str(val_folder)})
    settings = build_settings(str(run_dir), config, overrides)
    console = make_console()
    summary = pretrain(settings, resume=resume, console=console)
    console.print(f"best epoch {summary['best_epoch']}: "
                  + ", ".join(f"{name} {value:.2f}" for name, value in (summary["val"] or {}).items()))
    console.print(f"checkpoint: {summary['checkpoint']}  (use --pretrained {summary['checkpoint']} --model {settings.arch})")


COMMANDS = {"pretrain": pretrain_command}
