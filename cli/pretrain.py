"""``mora-ret pretrain``: contrastive CLIP training on a COCO-format caption set or a captioned folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import device_option, make_console


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_command(
        run_dir: Path = typer.Option(Path("runs/pretrain"), "--run-dir", help="Run folder."),
        model: str = typer.Option("mora-tiny", "--model", help="open_clip architecture."),
        init: Optional[str] = typer.Option(None, "--init", help="Start from these weights (tag or file); default: scratch."),
        coco_root: Optional[Path] = typer.Option(None, "--coco-root", help="COCO-format root (annotations/captions_*.json)."),
        train_split: str = typer.Option("train2017", "--train-split"),
        val_split: Optional[str] = typer.Option("val2017", "--val-split", help="'' to skip validation."),
        folder: Optional[Path] = typer.Option(None, "--folder", help="Folder of images with sidecar .txt captions."),
        val_folder: Optional[Path] = typer.Option(None, "--val-folder"),
        epochs: int = typer.Option(10, "--epochs"),
        batch_size: int = typer.Option(128, "--batch-size"),
        lr: float = typer.Option(1e-3, "--lr"),
        weight_decay: float = typer.Option(0.1, "--weight-decay"),
        workers: int = typer.Option(0, "--workers"),
        device: str = device_option(),
        seed: int = typer.Option(0, "--seed"),
        resume: bool = typer.Option(False, "--resume"),
    ) -> None:
        """Pretrain CLIP contrastively; writes RUN_DIR/pretrained.safetensors (a plain open_clip checkpoint)."""

        from mora_retrieval.engine import TrainConfig
        from mora_retrieval.tasks.pretrain import PretrainSettings, pretrain

        settings = PretrainSettings(
            run_dir=str(run_dir), arch=model, init=init,
            coco_root=None if coco_root is None else str(coco_root), train_split=train_split,
            val_split=val_split or None, folder=None if folder is None else str(folder),
            val_folder=None if val_folder is None else str(val_folder),
            train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                              num_workers=workers, device=device, seed=seed),
        )
        console = make_console()
        summary = pretrain(settings, resume=resume, console=console)
        console.print(f"best epoch {summary['best_epoch']}: {summary['val']}")
        console.print(f"checkpoint: {summary['checkpoint']}  (use --pretrained {summary['checkpoint']} --model {model})")
