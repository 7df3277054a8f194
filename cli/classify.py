"""``mora-ret classify`` (train / eval-only / grid) and ``mora-ret predict`` for missing-modality classification."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .options import (ADAPTER_SETTINGS, CONFIG_OPTION, JSON_OPTION, MODEL_SETTINGS, PROMPT_DEFAULTS, PROMPT_SETTINGS,
                      SKIP_BAD_IMAGES_OPTION, TRAINING_DEFAULTS, TRAINING_SETTINGS, comma_list, device_option,
                      make_console, with_settings)

DATASETS = "food101 | mmimdb | hateful-memes"
CLASSIFY_DEFAULTS = {
    "model": "ViT-B-16", "pretrained": "openai", "method": "mora", "rank": "the dataset's",
    "rank_shared": "--rank, else the dataset's", "alpha": "the dataset's for MoRA and its ablations, r for lora/dora",
    "targets": "the dataset's", "layers": "2", "epochs": "the dataset's", "lr": "1e-2", "batch_size": "the dataset's",
    "weight_decay": "the dataset's", **PROMPT_DEFAULTS, **TRAINING_DEFAULTS,
}


def _test_table(head: str, result: dict):
    """The test metrics of a classification result; the title names its scenarios and the model tested."""
    from rich.table import Table

    scenario = result["scenario"]
    table = Table(title=f"{head}, train {scenario['train']} / test {scenario['test']} ({result['evaluated_on']} model)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["test"].items():
        style = "bold" if key == result["metric"] else None
        table.add_row(key, f"{value:.2f}" if key != "loss" else f"{value:.4f}", style=style)
    return table


@with_settings(MODEL_SETTINGS + ADAPTER_SETTINGS + PROMPT_SETTINGS + TRAINING_SETTINGS, CLASSIFY_DEFAULTS)
def classify(
    dataset: Optional[str] = typer.Argument(None, help=f"{DATASETS} (optional with --eval-only --run DIR or a --config naming it)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Dataset root in its published layout."),
    config: Optional[Path] = CONFIG_OPTION,
    missing: Optional[str] = typer.Option(None, "--missing", help="Training scenario: none | text:R | image:R | both:R[:S].  [default: both:0.7]"),
    test_missing: Optional[str] = typer.Option(None, "--test-missing", help="Test scenario [default: the training one]."),
    val_missing: Optional[str] = typer.Option(None, "--val-missing", help="Validation scenario [default: the training one]."),
    missing_image: Optional[str] = typer.Option(None, "--missing-image", help="Missing image as: ones (paper) | white (released code).  [default: ones]"),
    missing_seed: Optional[int] = typer.Option(None, "--missing-seed", help="Seed of the missing-modality draw.  [default: 0]"),
    missing_store: Optional[Path] = typer.Option(None, "--missing-store", help="Where drawn assignments are kept [default: DATA_ROOT/missing_assignments]."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "--run", help="Run folder (training output; the run to re-test with --eval-only; the grid's parent folder)."),
    features: Optional[str] = typer.Option(None, "--features", help="Head input: normalized | raw CLIP embeddings.  [default: normalized]"),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="Batch of validation and test.  [default: 256]"),
    skip_bad_images: bool = SKIP_BAD_IMAGES_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (or grid) exactly."),
    eval_only: bool = typer.Option(False, "--eval-only", help="Re-test the finished run --run under --test-missing."),
    split: str = typer.Option("test", "--split", help="Split for --eval-only: test | val."),
    grid: bool = typer.Option(False, "--grid", help="Train and test every scenario of the paper's table."),
    grid_ratios: str = typer.Option("0.5,0.7,0.9", "--grid-ratios", help="Missing ratios of the grid."),
    grid_types: str = typer.Option("text,image,both", "--grid-types", help="Missing types of the grid."),
    methods: Optional[str] = typer.Option(None, "--methods", help="With --grid: one column per method, e.g. mora,lora,dora,dcp,mmp,full (the paper's Table 1 / 4); replaces --adapter."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    overrides: dict[str, Any] = None,
) -> None:
    """Train adapters + a linear head under missing modalities, keep the best epoch, merge, and test.

    Writes adapter/, head.safetensors, merged.safetensors and results.json into the run folder
    (besides the engine's config.json, metrics.jsonl, checkpoints/ and curves.png). The prompt
    methods (dcp, mmp) cannot be merged: they are tested unmerged and write no merged.safetensors.
    """
    from mora_retrieval.adapters import get_method
    from mora_retrieval.errors import TrainingError
    from mora_retrieval.tasks.classify import build_settings, train_classifier

    console = make_console(quiet=quiet)
    train = overrides.get("train", {})
    if eval_only:
        _eval_only(console, dataset, run_dir, test_missing, data_root, split, train.get("device", "auto"),
                   eval_batch_size, train.get("num_workers"))
        return
    overrides.update({"missing": missing, "val_missing": val_missing, "test_missing": test_missing,
                      "missing_image": missing_image, "missing_seed": missing_seed,
                      "missing_store": None if missing_store is None else str(missing_store), "features": features,
                      "eval_batch_size": eval_batch_size, "skip_bad_images": skip_bad_images or None})
    method_list = comma_list(methods)
    if method_list is not None and (not grid or not method_list):
        raise TrainingError("--methods needs --grid and at least one method (e.g. --grid --methods mora,dcp)")
    root = None if data_root is None else str(data_root)
    if method_list:
        for each in method_list:
            get_method(each)  # one line naming the known methods, before any training (run_grid refuses repeats)
        # each method: its defaults, then --config, then the command line, as a run of its own would have
        per_method = [build_settings(dataset, root, config, _for_method(overrides, each))[0] for each in method_list]
        overrides = _for_method(overrides, method_list[0])
    elif PROMPT_KEYS & set(overrides.get("adapter", {})):
        chosen = overrides.get("adapter", {}).get("method") or "mora"
        if get_method(chosen).make_prompts is None:
            raise TrainingError(f"--prompt-length and --prompt-depth apply to the prompt methods dcp and mmp, not "
                                f"{chosen}")
    settings, train_config = build_settings(dataset, root, config, overrides)
    name, method = settings.dataset, settings.adapter.method
    if grid:
        default_dir = f"runs/classify-{name}-grid" if method_list else f"runs/classify-{name}-{method}-grid"
        _grid(console, settings, train_config, run_dir or Path(default_dir), grid_ratios, grid_types, resume, quiet,
              per_method if method_list else None)
        return
    run_dir = run_dir or Path(f"runs/classify-{name}-{method}-{settings.scenarios['train'].replace(':', '')}")
    results = train_classifier(settings, train_config, run_dir, resume=resume, console=console, quiet=quiet)
    if results is None:  # a non-zero torchrun rank
        return
    console.print(_test_table(f"{name} test — {method} on {settings.arch}", results))
    share = results["trainable"]
    console.print(f"best epoch {results['best_epoch']} (val {results['metric']} {results['best_val_metric']:.2f}); "
                  f"majority baseline {results['majority_baseline']:.2f}; trainable {share['params']:,} "
                  f"({share['percent']:.3f}% of {share['total']:,})")
    console.print(f"run folder: {run_dir}")


def predict(
    run: Path = typer.Option(..., "--run", help="A finished `mora-ret classify` run folder."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image file (absent: treated as a missing image)."),
    text: Optional[str] = typer.Option(None, "--text", help="Text (absent: treated as a missing text)."),
    top_k: int = typer.Option(5, "--top-k", help="Classes listed for multiclass tasks."),
    device: str = device_option(),
    as_json: bool = JSON_OPTION,
) -> None:
    """Classify one image and/or text with a run's merged model and head."""
    import json

    from rich.table import Table

    from mora_retrieval.tasks.classify import predict_run

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
    from mora_retrieval.data.registry import canonical_name
    from mora_retrieval.errors import TrainingError
    from mora_retrieval.runs import EVAL_DIR
    from mora_retrieval.tasks.classify import evaluate_run
    from mora_retrieval.tasks.classify.settings import read_run_config

    if run_dir is None:
        raise TrainingError("--eval-only needs --run DIR (a finished classification run)")
    record = read_run_config(run_dir)
    if dataset is not None and canonical_name(dataset) != record["dataset"]:
        raise TrainingError(f"{run_dir}: the run was trained on {record['dataset']}, not {canonical_name(dataset)}")
    result = evaluate_run(run_dir, test_missing=test_missing, data_root=str(data_root) if data_root else None,
                          split=split, device=device, batch_size=batch_size, num_workers=workers, console=console)
    console.print(_test_table(f"{result['dataset']} {split} — {result['method']}", result))
    console.print(f"written to {Path(run_dir) / EVAL_DIR}")


PROMPT_KEYS = {"prompt_length", "prompt_depth"}


def _for_method(overrides: dict, method: str) -> dict:
    """The command line's settings for one method of a grid: its name, and the prompt options only
    for the prompt methods (dcp, mmp)."""
    from mora_retrieval.adapters import get_method

    adapter = {**overrides.get("adapter", {}), "method": method}
    if get_method(method).make_prompts is None:
        adapter = {k: v for k, v in adapter.items() if k not in PROMPT_KEYS}
    return {**overrides, "adapter": adapter}


def _grid(console, settings, train_config, out_dir: Path, ratios: str, types: str, resume: bool, quiet: bool,
          per_method: Optional[list] = None) -> None:
    from rich.markdown import Markdown

    from mora_retrieval.errors import TrainingError
    from mora_retrieval.tasks.classify.recipes import run_grid

    try:
        ratio_values = tuple(float(r) for r in comma_list(ratios) or ())
    except ValueError:
        raise TrainingError(f"--grid-ratios must be numbers separated by commas, got {ratios!r}") from None
    run_grid(settings, train_config, out_dir, ratios=ratio_values, types=tuple(comma_list(types) or ()),
             resume=resume, console=console, quiet=quiet, methods=per_method)
    if (out_dir / "grid.md").is_file():
        console.print(Markdown((out_dir / "grid.md").read_text(encoding="utf-8")))
        console.print(f"tables: {out_dir / 'grid.md'}, {out_dir / 'grid.csv'}")


COMMANDS = {"classify": classify, "predict": predict}
