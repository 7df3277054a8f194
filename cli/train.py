"""``mora-ret train cirr``: CLIP4CIR + adapters on CIRR (stage 1, then the Combiner)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import DEVICE_HELP, PRECISION_HELP, command_group, make_console

train_app = command_group("Train models (CIR on CIRR).")


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@train_app.command("cirr")
def train_cirr_command(
    data_root: Path = typer.Option(..., "--data-root", help="CIRR root (captions/, image_splits/, train/, dev/)."),
    run_dir: Path = typer.Option(Path("runs/cirr"), "--run-dir", help="Run folder to create (or resume)."),
    method: str = typer.Option("mora", "--adapter", help="mora | lora | dora | bitfit | full | an ablation."),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture.  [default: ViT-B-16]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip tag (downloaded by open_clip) or local checkpoint file; `none` for random weights.  [default: openai]"),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON/TOML file of settings (any subset of config.json; command-line options win)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="r (and r_s) of the adapter.  [default: 4]"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Low-rank strength α.  [default: 0.01 for MoRA and its ablations, r for lora/dora]"),
    targets: Optional[str] = typer.Option(None, "--targets", help="Projections, e.g. q,v or q,k,v,out.  [default: q,v]"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Adapt the last N blocks of each tower.  [default: 2]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Stage-1 epochs.  [default: 20]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Stage-1 learning rate.  [default: 1e-2; 2e-6 for full]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Stage-1 batch per process.  [default: 256; 128 for full]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Stage-1 AdamW weight decay.  [default: 0.02; 0.01 for full]"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimiser step.  [default: 1]"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping after N epochs without gain.  [default: off]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop stage 1 after N optimiser steps.  [default: off]"),
    combiner_epochs: Optional[int] = typer.Option(None, "--combiner-epochs", help="Stage-2 (Combiner) epochs.  [default: 20]"),
    combiner_lr: Optional[float] = typer.Option(None, "--combiner-lr", help="Stage-2 learning rate.  [default: 2e-5]"),
    combiner_batch_size: Optional[int] = typer.Option(None, "--combiner-batch-size", help="Stage-2 batch.  [default: 512]"),
    no_combiner: bool = typer.Option(False, "--no-combiner", help="Stop after stage 1."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes.  [default: 0]"),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP + "  [default: auto]"),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP + "  [default: auto]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed.  [default: 0]"),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip (and count) unreadable images."),
    cache_frozen: bool = typer.Option(False, "--cache-frozen",
                                      help="Cache the frozen blocks' outputs across epochs (stage 1; needs memory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --run-dir exactly."),
) -> None:
    """Train CLIP4CIR + MoRA (or another adapter) on CIRR; writes adapter, merged checkpoint and Combiner."""

    from mora_retrieval.tasks.cir_run import build_settings, train_cirr

    from .tables import metrics_table

    run = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
           "grad_accum": grad_accum, "patience": patience, "max_steps": max_steps, "num_workers": workers,
           "device": device, "precision": precision, "seed": seed}
    overrides = {
        "arch": model,
        "pretrained": pretrained,
        "skip_bad_images": skip_bad_images or None,
        "cache_frozen": cache_frozen or None,
        "adapter": {"r": rank, "r_shared": rank, "alpha": alpha, "targets": _csv(targets), "layers": layers},
        "stage1": run,
        "stage2": {"epochs": combiner_epochs, "lr": combiner_lr, "batch_size": combiner_batch_size,
                   "num_workers": workers, "device": device, "precision": precision, "seed": seed},
        "no_combiner": no_combiner or None,
    }
    settings = build_settings(str(data_root), str(run_dir), method, config, overrides, resume=resume)
    console = make_console()
    results = train_cirr(settings, resume=resume, console=console)
    rows = {"stage 1 (summed features)": results["val_stage1"]}
    if "val_combiner" in results:
        rows["stage 2 (Combiner)"] = results["val_combiner"]
    console.print(metrics_table(f"CIRR val — {settings.adapter.method} on {settings.arch}", rows))
    console.print(f"trainable parameters: {results['trainable_parameters']:,} "
                  f"({results['trainable_percent']:.3f}% of {results['total_parameters']:,})")
    console.print(f"run folder: {run_dir}")


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
