"""Classification runs: train → keep the best epoch → merge → test; eval-only; the scenario grid.

The run folder is the engine's (in the folder itself) with the files of :mod:`mora_retrieval.runs`:
``adapter/`` and ``head.safetensors`` (metadata: task, feature mode, class names) of the best epoch,
``merged.safetensors`` (none for the prompt methods ``dcp``, ``mmp``, which are tested and loaded
unmerged), ``results.json`` (test metrics on the merged model, ``evaluated_on``, under the test
scenario, with the best epoch, trainable share and majority-class baseline) and ``eval/``. Once
training is done ``config.json`` gains a top-level ``classify`` record (every setting, the test
scenario included) and ``task``/``arch``/``pretrained`` keys, so ``--run DIR`` alone re-creates the
model and the data.

The random weights of an architecture without ``pretrained`` are drawn from the training seed,
so a resumed run rebuilds the very same frozen backbone.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...adapters import add_adapters, export_checkpoint, get_method, merge_adapters, save_adapters, trainable_share
from ...data.missing import MissingSpec
from ...device import resolve_num_workers, resolve_precision
from ...engine import TrainConfig, Trainer
from ...engine.distributed import detect
from ...errors import TrainingError
from ...fileio import atomic_write, read_json
from ...model.backbone import embed_dim, load_backbone
from ...model.heads import CLIPClassifier, LinearHead, save_head
from ...runs import (ADAPTER_DIR, EVAL_DIR, HEAD_FILE, MERGED_FILE, RESULTS_FILE, resumable, update_record,
                     write_results)
from .metrics import MAIN_METRIC, majority_baseline
from .model import ClassifyCollate, ClassifyModule, evaluate_classifier
from .predict import Predictor
from .settings import ClassifySettings, scenario_data


def _missing_counts(dataset: Any) -> dict[str, int]:
    """How many samples of each missing-modality code the dataset holds."""
    return dict(zip(("complete", "text_missing", "image_missing"), np.bincount(dataset.codes, minlength=3).tolist()))


def train_classifier(settings: ClassifySettings, train_config: TrainConfig, run_dir: str | os.PathLike,
                     resume: bool = False, console: Any = None, quiet: bool = False) -> dict[str, Any] | None:
    """Train, select the best epoch on validation, merge, test; returns ``results.json``'s content.
    Under ``torchrun`` only rank 0 finishes the run (files, test); other ranks return ``None``."""
    run_dir = Path(run_dir)
    scen = settings.scenarios
    probe = scenario_data(settings, "train", scen["train"], transform=None)
    torch.manual_seed(train_config.seed)
    backbone = load_backbone(settings.arch, settings.pretrained)
    add_adapters(backbone.model, settings.adapter)
    head = LinearHead(2 * embed_dim(backbone.model), 2 if probe.task == "binary" else probe.num_classes)
    classifier = CLIPClassifier(backbone.model, head, settings.features)
    train_set = scenario_data(settings, "train", scen["train"], backbone.preprocess)
    val_set = scenario_data(settings, "val", scen["val"], backbone.preprocess)
    collate = ClassifyCollate(backbone.tokenizer)
    module = ClassifyModule(classifier, probe.task, val_set, collate, settings.eval_batch_size)
    shares = trainable_share(classifier.clip, classifier.head)
    trainer = Trainer(module, train_config, run_dir, train_set, collate_fn=collate, console=console,
                      extra_config=settings.training_record(), quiet=quiet)
    fit = trainer.fit(resume=resumable(run_dir, resume))  # nothing to resume yet: start afresh, as train cirr does
    if not detect().is_main:
        return None
    device = trainer.device
    trainer.restore_best()
    module.to("cpu")
    save_adapters(classifier.clip, run_dir / ADAPTER_DIR, arch=settings.arch,
                  extra={"pretrained": settings.pretrained, "task": "classify", "dataset": settings.dataset})
    save_head(classifier.head, run_dir / HEAD_FILE, probe.task, probe.class_names, settings.features)
    mergeable = get_method(settings.adapter.method).mergeable
    if mergeable:  # prompt methods are tested as they trained: unmerged
        merge_adapters(classifier.clip)
        export_checkpoint(classifier.clip, run_dir / MERGED_FILE)
    record = {**settings.to_dict(), "scenarios": scen, "dataset_task": probe.task,
              "class_names": list(probe.class_names)}
    update_record(run_dir, task="classify", arch=settings.arch, pretrained=settings.pretrained,
                  dataset=settings.dataset, scenarios=scen, classify=record)

    classifier.to(device)
    test_set = scenario_data(settings, "test", scen["test"], backbone.preprocess)
    test = evaluate_classifier(classifier, probe.task, test_set, collate, device, settings.eval_batch_size,
                               trainer.num_workers, trainer.precision, None if quiet else console,
                               f"test ({scen['test']})")
    results = {
        **_test_result(settings, probe.task, test, "merged" if mergeable else "unmerged", arch=settings.arch,
                       pretrained=settings.pretrained, scenario=scen),
        "best_epoch": fit.best_epoch,
        "best_val_metric": fit.best_metric,
        "epochs_run": len(fit.history),
        "stopped_early": fit.stopped_early,
        "trainable": {"params": shares[0], "total": shares[1], "percent": shares[2]},
        "majority_baseline": majority_baseline(probe.task, _labels(train_set), _labels(test_set)),
        "samples": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
        "missing_counts": {"train": _missing_counts(train_set), "val": _missing_counts(val_set),
                           "test": _missing_counts(test_set)},
    }
    write_results(run_dir / RESULTS_FILE, results)
    return results


def _test_result(settings: ClassifySettings, task: str, metrics: dict[str, float], evaluated_on: str,
                 **where: Any) -> dict[str, Any]:
    """What ``results.json`` and ``eval/…json`` share: the run, ``where`` it was tested, the metrics."""
    metric = MAIN_METRIC[task]
    return {"task": "classify", "dataset": settings.dataset, "method": settings.adapter.method, **where,
            "metric": metric, "test_metric": metrics[metric], "test": metrics, "evaluated_on": evaluated_on}


def _labels(dataset: Any) -> torch.Tensor:
    """All labels of a classification dataset, without decoding images."""
    return torch.stack([dataset.label_tensor(i) for i in range(len(dataset))])


def evaluate_run(run_dir: str | os.PathLike, test_missing: str | None = None, data_root: str | None = None,
                 split: str = "test", device: str = "auto", batch_size: int | None = None, num_workers: int | None = None,
                 console: Any = None) -> dict[str, Any]:
    """Re-test a finished run (:class:`~.predict.Predictor`) under another scenario; writes ``eval/…json``.
    ``data_root`` replaces the run's data root (the default assignment store moves with it)."""
    trained = Predictor(run_dir, device)
    settings, dev = trained.settings, trained.device
    if data_root is not None:
        settings = replace(settings, data_root=data_root)
    scenario = str(MissingSpec.parse(test_missing)) if test_missing else settings.scenarios["test"]
    dataset = scenario_data(settings, split, scenario, trained.preprocess)
    metrics = evaluate_classifier(trained.classifier, trained.task, dataset, ClassifyCollate(trained.tokenizer), dev,
                                  batch_size or settings.eval_batch_size, resolve_num_workers(num_workers, dev),
                                  resolve_precision("auto", dev), console, f"{split} ({scenario})")
    result = {**_test_result(settings, trained.task, metrics, trained.evaluated_on, split=split,
                             scenario={"train": settings.scenarios["train"], "test": scenario}),
              "samples": len(dataset), "missing_counts": _missing_counts(dataset)}
    write_results(Path(run_dir) / EVAL_DIR / f"{split}-{scenario.replace(':', '_')}.json", result)
    return result


# ---------------------------------------------------------------- grid

GRID_TYPES = ("text", "image", "both")
GRID_RATIOS = (0.5, 0.7, 0.9)


def run_grid(settings: ClassifySettings, train_config: TrainConfig, out_dir: str | os.PathLike,
             ratios: tuple[float, ...] = GRID_RATIOS, types: tuple[str, ...] = GRID_TYPES, resume: bool = False,
             console: Any = None, quiet: bool = False,
             methods: Sequence[ClassifySettings] | None = None) -> list[dict[str, Any]]:
    """The paper's tables: one run per (type, ratio), trained and tested on that scenario.

    The cells live in ``out_dir/<type>-<ratio>``, or, with ``methods`` (one settings per method, the
    Table 1 / Table 4 shape), in ``out_dir/<method>/<type>-<ratio>``. A cell whose ``results.json`` exists
    is reused (one holding another method's run is refused); with ``resume`` an interrupted cell is
    continued. Writes ``grid.md`` and ``grid.csv`` in ``out_dir`` and returns the rows.
    """
    bad = [t for t in types if t not in GRID_TYPES] + [str(r) for r in ratios if not 0.0 < r <= 1.0]
    if bad or not types or not ratios:
        raise TrainingError(f"--grid-types must be from {','.join(GRID_TYPES)} and --grid-ratios in (0, 1] "
                            f"(bad: {', '.join(bad)})")
    out_dir = Path(out_dir)
    plan = [(out_dir, settings)] if not methods else [(out_dir / m.adapter.method, m) for m in methods]
    names = [base.adapter.method for _, base in plan]
    if len(set(names)) != len(names):
        raise TrainingError(f"the grid repeats a method: {', '.join(names)}")
    rows = []
    for folder, base in plan:
        name = base.adapter.method
        for kind, ratio in itertools.product(types, ratios):
            scenario = f"{kind}:{ratio:g}"
            cell = folder / f"{kind}-{ratio:g}"
            done = cell / RESULTS_FILE
            if done.is_file():
                result = read_json(done, "results file", error=TrainingError)
                if result.get("method") != name:
                    raise TrainingError(f"{done}: the cell holds a {result.get('method')!r} run, not {name!r} "
                                        f"(another grid's folder?); pick another --run-dir")
            else:
                if console is not None and not quiet:
                    console.rule(f"{base.dataset} · {name}: train = test = {scenario}")
                cell_settings = replace(base, missing=scenario, val_missing=None, test_missing=scenario)
                result = train_classifier(cell_settings, train_config, cell, resume=resume, console=console,
                                          quiet=quiet)
                if result is None:  # a non-zero rank under torchrun
                    continue
            rows.append({"dataset": base.dataset, "method": name, "missing_type": kind, "ratio": ratio,
                         "metric": result["metric"], "value": result["test_metric"], "run_dir": str(cell)})
    if rows:
        write_grid_tables(rows, out_dir)
    return rows


def _cell(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def write_grid_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """``grid.csv`` (one row per cell) and ``grid.md``, atomically.

    One method: missing types × ratios. Several (the paper's Table 1 shape): one column per
    method, one row per (ratio, missing type), and each ratio's average over its types.
    """
    with atomic_write(out_dir / "grid.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    ratios = sorted({r["ratio"] for r in rows})
    types = list(dict.fromkeys(r["missing_type"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["method"], r["missing_type"], r["ratio"]): r["value"] for r in rows}
    first = rows[0]
    if len(methods) == 1:
        lines = [f"{first['dataset']} · {first['method']} · {first['metric']} (%) · train = test scenario", "",
                 "| missing type | " + " | ".join(f"η = {100 * r:g}%" for r in ratios) + " |",
                 "|---|" + "---:|" * len(ratios)]
        for kind in types:
            lines.append(f"| {kind} | " + " | ".join(_cell(value.get((methods[0], kind, r))) for r in ratios) + " |")
    else:
        lines = [f"{first['dataset']} · {first['metric']} (%) · train = test scenario", "",
                 "| η | missing | " + " | ".join(methods) + " |", "|---:|---|" + "---:|" * len(methods)]
        for ratio in ratios:
            for kind in types:
                cells = [_cell(value.get((m, kind, ratio))) for m in methods]
                lines.append(f"| {100 * ratio:g}% | {kind} | " + " | ".join(cells) + " |")
            if len(types) > 1:
                means = []
                for m in methods:
                    got = [value.get((m, kind, ratio)) for kind in types]
                    means.append(_cell(None if None in got else sum(got) / len(got)))  # a NaN cell: NaN, "–"
                lines.append(f"| {100 * ratio:g}% | average | " + " | ".join(means) + " |")
    with atomic_write(out_dir / "grid.md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
