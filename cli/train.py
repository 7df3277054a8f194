"""``mora-ret train cirr``: CLIP4CIR + adapters on CIRR (stage 1, then the Combiner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .options import (ADAPTER_SETTINGS, CONFIG_OPTION, INPUT_DEFAULTS, INPUT_SETTINGS, MODEL_SETTINGS, RESUME_OPTION,
                      SKIP_BAD_IMAGES_OPTION, TRAINING_DEFAULTS, TRAINING_SETTINGS, make_console, with_settings)

CIR_DEFAULTS = {
    "model": "ViT-B-16", "pretrained": "openai", "method": "mora", "rank": "4", "rank_shared": "--rank, else 4",
    "alpha": "0.01 for MoRA and its ablations, r for lora/dora", "targets": "q,v", "layers": "2",
    "epochs": "20", "lr": "1e-2; 2e-6 for full", "batch_size": "256; 128 for full",
    "weight_decay": "0.02; 0.01 for full", **TRAINING_DEFAULTS, **INPUT_DEFAULTS,
}
#: The stage-1 options that the Combiner's stage shares (--max-steps limits each stage).
SHARED_WITH_STAGE2 = ("num_workers", "device", "precision", "seed", "max_steps")


@with_settings(MODEL_SETTINGS + ADAPTER_SETTINGS + TRAINING_SETTINGS + INPUT_SETTINGS, CIR_DEFAULTS, section="stage1")
def train_cirr_command(
    data_root: Path = typer.Option(..., "--data-root", help="CIRR root (captions/, image_splits/, train/, dev/)."),
    run_dir: Path = typer.Option(Path("runs/cirr"), "--run-dir", help="Run folder to create (or resume)."),
    config: Optional[Path] = CONFIG_OPTION,
    combiner_epochs: Optional[int] = typer.Option(None, "--combiner-epochs", help="Stage-2 (Combiner) epochs.  [default: 20]"),
    combiner_lr: Optional[float] = typer.Option(None, "--combiner-lr", help="Stage-2 learning rate.  [default: 2e-5]"),
    combiner_batch_size: Optional[int] = typer.Option(None, "--combiner-batch-size", help="Stage-2 batch.  [default: 512]"),
    no_combiner: bool = typer.Option(False, "--no-combiner", help="Stop after stage 1."),
    skip_bad_images: bool = SKIP_BAD_IMAGES_OPTION,
    cache_frozen: bool = typer.Option(False, "--cache-frozen",
                                      help="Cache the frozen blocks' outputs across epochs (stage 1; needs memory)."),
    resume: bool = RESUME_OPTION,
    overrides: dict[str, Any] = None,
) -> None:
    """Train CLIP4CIR + MoRA (or another adapter) on CIRR; writes adapter, merged checkpoint and Combiner.

    The model, adapter and training options set stage 1; --workers, --device, --precision,
    --seed and --max-steps apply to the Combiner's stage too.
    """
    from mora_retrieval.tasks.cir import build_settings, train_cirr

    from .tables import metrics_table

    stage1 = overrides.get("stage1", {})
    overrides.update({
        "skip_bad_images": skip_bad_images or None,
        "cache_frozen": cache_frozen or None,
        "stage2": {"epochs": combiner_epochs, "lr": combiner_lr, "batch_size": combiner_batch_size,
                   **{key: stage1.get(key) for key in SHARED_WITH_STAGE2}},
        "no_combiner": no_combiner or None,
    })
    settings = build_settings(str(data_root), str(run_dir), config_file=config, overrides=overrides, resume=resume)
    console = make_console()
    results = train_cirr(settings, resume=resume, console=console)
    rows = {"stage 1 (summed features)": results["val_stage1"]}
    if "val_combiner" in results:
        rows["stage 2 (Combiner)"] = results["val_combiner"]
    console.print(metrics_table(f"CIRR val — {settings.adapter.method} on {settings.arch}", rows))
    console.print(f"trainable parameters: {results['trainable_parameters']:,} "
                  f"({results['trainable_percent']:.3f}% of {results['total_parameters']:,})")
    dropped = {split: n for split, n in (results.get("dropped_triplets") or {}).items() if n}
    if dropped:
        console.print("left out for unreadable images: "
                      + ", ".join(f"{n} {split} triplet(s)" for split, n in dropped.items()))
    console.print(f"run folder: {run_dir}")


COMMANDS = {"train cirr": train_cirr_command}
