"""``mora-ret train cirr``: CLIP4CIR + adapters on CIRR (stage 1, then the Combiner)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

train_app = typer.Typer(help="Train models (CIR on CIRR).", no_args_is_help=True)

# mora_retrieval.adapters.list_methods(), written out so that --help imports no torch
# (tests/test_cli_app.py checks that the two agree).
METHOD_HELP = ("Adapter method: mora | no_gram | learned_gram | no_shared | no_specific | subtract_base | lora | dora "
               "| bitfit | full.")


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@train_app.command("cirr")
def train_cirr_command(
    data_root: Path = typer.Option(..., "--data-root", help="CIRR root (captions/, image_splits/, train/, dev/)."),
    run_dir: Path = typer.Option(Path("runs/cirr"), "--run-dir", help="Run folder to create (or resume)."),
    method: str = typer.Option("mora", "--adapter", help=METHOD_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip architecture [default: ViT-B-16]."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip tag or local checkpoint [default: openai]."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON/TOML file of settings (CLI options win)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="r (and r_s) of the adapter."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Low-rank strength α."),
    targets: Optional[str] = typer.Option(None, "--targets", help="Projections, e.g. q,v or q,k,v,out."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Adapt the last N blocks of each tower."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping after N epochs without gain."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    combiner_epochs: Optional[int] = typer.Option(None, "--combiner-epochs"),
    combiner_lr: Optional[float] = typer.Option(None, "--combiner-lr"),
    combiner_batch_size: Optional[int] = typer.Option(None, "--combiner-batch-size"),
    no_combiner: bool = typer.Option(False, "--no-combiner", help="Stop after stage 1."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:1 …"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 on GPU) | bf16 | fp32."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip (and count) unreadable images."),
    cache_frozen: bool = typer.Option(False, "--cache-frozen",
                                      help="Cache the frozen blocks' outputs across epochs (stage 1; needs memory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --run-dir exactly."),
) -> None:
    """Train CLIP4CIR + MoRA (or another adapter) on CIRR; writes adapter, merged checkpoint and Combiner."""
    from rich.console import Console

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
    console = Console()
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
