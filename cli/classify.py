"""``mora-ret classify`` (train / eval-only / grid) and ``mora-ret predict`` for missing-modality classification."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import METHOD_HELP, device_option, make_console, workers_option

DATASETS = "food101 | mmimdb | hateful-memes"


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _metrics_table(title: str, metrics: dict, main: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        style = "bold" if key == main else None
        table.add_row(key, f"{value:.2f}" if key != "loss" else f"{value:.4f}", style=style)
    return table


def register(app: typer.Typer) -> None:
    @app.command("classify")
    def classify(
        dataset: Optional[str] = typer.Argument(None, help=f"{DATASETS} (optional with --eval-only --run DIR)."),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root in its published layout."),
        missing: str = typer.Option("both:0.7", "--missing", help="Training scenario: none | text:R | image:R | both:R[:S]."),
        test_missing: Optional[str] = typer.Option(None, "--test-missing", help="Test scenario [default: the training one]."),
        val_missing: Optional[str] = typer.Option(None, "--val-missing", help="Validation scenario [default: the training one]."),
        missing_image: str = typer.Option("ones", "--missing-image", help="Missing image as: ones (paper) | white (released code)."),
        missing_seed: int = typer.Option(0, "--missing-seed", help="Seed of the missing-modality draw."),
        missing_store: Optional[Path] = typer.Option(None, "--missing-store", help="Where drawn assignments are kept [default: DATA_ROOT/missing_assignments]."),
        method: str = typer.Option("mora", "--adapter", help=METHOD_HELP),
        model: str = typer.Option("ViT-B-16", "--model", help="open_clip architecture."),
        pretrained: Optional[str] = typer.Option("openai", "--pretrained", help="open_clip tag, local checkpoint, or 'none'."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", "--run", help="Run folder (training output; the run to re-test with --eval-only; the grid's parent folder)."),
        rank: Optional[int] = typer.Option(None, "--rank", help="r of the adapter [dataset default]."),
        rank_shared: Optional[int] = typer.Option(None, "--rank-shared", help="r_s of MoRA's shared part [default: --rank or the dataset's]."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="Low-rank strength α [dataset default for MoRA]."),
        targets: Optional[str] = typer.Option(None, "--targets", help="Projections, e.g. q,v [dataset default]."),
        layers: Optional[int] = typer.Option(None, "--layers", help="Adapt the last N blocks of each tower [2]."),
        prompt_length: Optional[int] = typer.Option(None, "--prompt-length", help="dcp / mmp: prompt tokens per block [dcp 36, mmp 16]."),
        prompt_depth: Optional[int] = typer.Option(None, "--prompt-depth", help="dcp / mmp: prompts in the first N blocks of each tower [6]."),
        features: str = typer.Option("normalized", "--features", help="Head input: normalized | raw CLIP embeddings."),
        epochs: Optional[int] = typer.Option(None, "--epochs"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size"),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
        warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio"),
        max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm"),
        patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping after N epochs without gain."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps"),
        eval_batch_size: int = typer.Option(256, "--eval-batch-size"),
        workers: Optional[int] = workers_option(),
        device: str = device_option(),
        precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU) | bf16 | fp32."),
        seed: int = typer.Option(0, "--seed", help="Training seed (also draws random backbone weights)."),
        skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip (and count) unreadable images."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (or grid) exactly."),
        eval_only: bool = typer.Option(False, "--eval-only", help="Re-test the finished run --run under --test-missing."),
        split: str = typer.Option("test", "--split", help="Split for --eval-only: test | val."),
        grid: bool = typer.Option(False, "--grid", help="Train and test every scenario of the paper's table."),
        grid_ratios: str = typer.Option("0.5,0.7,0.9", "--grid-ratios", help="Missing ratios of the grid."),
        grid_types: str = typer.Option("text,image,both", "--grid-types", help="Missing types of the grid."),
        methods: Optional[str] = typer.Option(None, "--methods", help="With --grid: one column per method, e.g. mora,lora,dora,dcp,mmp,full (the paper's Table 1 / 4); replaces --adapter."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    ) -> None:
        """Train adapters + a linear head under missing modalities, keep the best epoch, merge, and test.

        Writes adapter/, head.safetensors, merged.safetensors and results.json into the run folder
        (besides the engine's config.json, metrics.jsonl, checkpoints/ and curves.png). The prompt
        methods (dcp, mmp) cannot be merged: they are tested unmerged and write no merged.safetensors.
        """

        from mora_retrieval.errors import TrainingError

        console = make_console(quiet=quiet)
        if eval_only:
            _eval_only(console, dataset, run_dir, test_missing, data_root, split, device, eval_batch_size, workers)
            return
        if dataset is None or data_root is None:
            raise TrainingError("give the dataset and --data-root (e.g. mora-ret classify food101 --data-root DIR)")
        from mora_retrieval.tasks.classify_run import train_classifier
        from mora_retrieval.tasks.classify_setup import (ClassifySettings, canonical_dataset, default_adapter_config,
                                                         default_train_config)

        name = canonical_dataset(dataset)
        method_list = _csv(methods)
        if method_list is not None and (not grid or not method_list):
            raise TrainingError("--methods needs --grid and at least one method (e.g. --grid --methods mora,dcp)")
        overrides = dict(r=rank, r_shared=rank_shared or rank, alpha=alpha, targets=_csv(targets), layers=layers,
                         prompt_length=prompt_length, prompt_depth=prompt_depth)
        adapter = default_adapter_config(name, method_list[0] if method_list else method, **overrides)
        settings = ClassifySettings(
            dataset=name, data_root=str(data_root), arch=model, pretrained=pretrained, adapter=adapter.to_dict(),
            missing=missing, val_missing=val_missing, test_missing=test_missing, missing_image=missing_image,
            missing_seed=missing_seed, missing_store=str(missing_store) if missing_store else None,
            features=features, eval_batch_size=eval_batch_size, skip_bad_images=skip_bad_images)
        train_config = default_train_config(
            name, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, grad_accum=grad_accum,
            warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, patience=patience, max_steps=max_steps,
            num_workers=workers, device=device, precision=precision, seed=seed)
        if grid:
            default_dir = f"runs/classify-{name}-grid" if method_list else f"runs/classify-{name}-{method}-grid"
            _grid(console, settings, train_config, run_dir or Path(default_dir), grid_ratios, grid_types, resume,
                  quiet, method_list, overrides)
            return
        run_dir = run_dir or Path(f"runs/classify-{name}-{method}-{settings.scenarios['train'].replace(':', '')}")
        results = train_classifier(settings, train_config, run_dir, resume=resume, console=console, quiet=quiet)
        if results is None:  # a non-zero torchrun rank
            return
        scen = results["scenario"]
        console.print(_metrics_table(
            f"{name} test — {results['method']} on {model}, train {scen['train']} / test {scen['test']} "
            f"({results['evaluated_on']} model)", results["test"], results["metric"]))
        share = results["trainable"]
        console.print(f"best epoch {results['best_epoch']} (val {results['metric']} {results['best_val_metric']:.2f}); "
                      f"majority baseline {results['majority_baseline']:.2f}; trainable {share['params']:,} "
                      f"({share['percent']:.3f}% of {share['total']:,})")
        console.print(f"run folder: {run_dir}")

    @app.command("predict")
    def predict(
        run: Path = typer.Option(..., "--run", help="A finished `mora-ret classify` run folder."),
        image: Optional[Path] = typer.Option(None, "--image", help="Image file (absent: treated as a missing image)."),
        text: Optional[str] = typer.Option(None, "--text", help="Text (absent: treated as a missing text)."),
        top_k: int = typer.Option(5, "--top-k", help="Classes listed for multiclass tasks."),
        device: str = device_option(),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Classify one image and/or text with a run's merged model and head."""
        import json
        from rich.table import Table

        from mora_retrieval.tasks.classify_predict import predict_run

        result = predict_run(run, image=image, text=text, top_k=top_k, device=device)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        title = f"{result.task} prediction" + (f" (missing {result.missing})" if result.missing != "none" else "")
        table = Table(title=title)
        table.add_column("label")
        table.add_column("score", justify="right")
        table.add_column("predicted", justify="center")
        for label, score in result.scores:
            table.add_row(label, f"{score:.4f}", "✓" if label in result.predicted else "")
        make_console().print(table)


def _eval_only(console, dataset, run_dir, test_missing, data_root, split, device, batch_size, workers) -> None:
    from mora_retrieval.errors import TrainingError
    from mora_retrieval.tasks.classify_run import evaluate_run
    from mora_retrieval.tasks.classify_setup import canonical_dataset, read_run_config

    if run_dir is None:
        raise TrainingError("--eval-only needs --run DIR (a finished classification run)")
    record = read_run_config(run_dir)
    if dataset is not None and canonical_dataset(dataset) != record["dataset"]:
        raise TrainingError(f"{run_dir}: the run was trained on {record['dataset']}, not {canonical_dataset(dataset)}")
    result = evaluate_run(run_dir, test_missing=test_missing, data_root=str(data_root) if data_root else None,
                          split=split, device=device, batch_size=batch_size, num_workers=workers, console=console)
    scen = result["scenario"]
    console.print(_metrics_table(
        f"{result['dataset']} {split} — {result['method']}, train {scen['train']} / test {scen['test']} "
        f"({result['evaluated_on']} model)", result["test"], result["metric"]))
    console.print(f"written to {Path(run_dir) / 'eval'}")


def _grid(console, settings, train_config, out_dir: Path, ratios: str, types: str, resume: bool, quiet: bool,
          methods: Optional[list[str]] = None, overrides: Optional[dict] = None) -> None:
    from rich.markdown import Markdown

    from mora_retrieval.errors import TrainingError
    from mora_retrieval.tasks.classify_run import GRID_TYPES, run_grid

    try:
        ratio_values = tuple(float(r) for r in _csv(ratios) or ())
    except ValueError:
        raise TrainingError(f"--grid-ratios must be numbers separated by commas, got {ratios!r}") from None
    kinds = tuple(_csv(types) or ())
    bad = [k for k in kinds if k not in GRID_TYPES] + [str(r) for r in ratio_values if not 0.0 < r <= 1.0]
    if bad or not kinds or not ratio_values:
        raise TrainingError(f"--grid-types must be from text,image,both and --grid-ratios in (0, 1] (bad: {', '.join(bad)})")
    if methods:
        from mora_retrieval.adapters import get_method

        for name in methods:
            get_method(name)  # one line naming the known methods, before any training
        if len(set(methods)) != len(methods):
            raise TrainingError(f"--methods repeats a method: {','.join(methods)}")
    run_grid(settings, train_config, out_dir, ratios=ratio_values, types=kinds, resume=resume, console=console,
             quiet=quiet, methods=tuple(methods) if methods else None, adapter_overrides=overrides)
    if (out_dir / "grid.md").is_file():
        console.print(Markdown((out_dir / "grid.md").read_text(encoding="utf-8")))
        console.print(f"tables: {out_dir / 'grid.md'}, {out_dir / 'grid.csv'}")
