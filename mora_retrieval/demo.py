"""The embedded default: the whole pipeline on the generated shapes world, no download needed.

``run_demo`` (``mora-ret demo``) writes the shapes world (unless the same one is there), pretrains a
small CLIP on its COCO-format captions from scratch (cached), trains CLIP4CIR on the CIRR-format part
with MoRA, LoRA (same rank and targets) and ``full`` fine-tuning under one budget (CIRR val metrics), indexes and
evaluates the COCO-format val images (image-to-image, text missing) for the pretrained and the CIR
models, trains a missing-modality classifier (MoRA, Food-101 format, ``both:0.7``) and analyses it
(``mora-ret analyze``), runs one composed search, and writes ``results.json`` and ``report.html``.
``full`` trains at ``full_lr``: CLIP4CIR's published 2e-6 barely moves a model pretrained from scratch
on this world in a few epochs, so it would not be a baseline.

Every figure comes from the run. Chance levels: CIRR Recall@K = min(K, gallery − 1) / (gallery − 1),
Recall_subset@K = K / 5; COCO Recall@K: :func:`coco_chance`; classification: the majority-class
baseline on the test set.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import hypergeom

from .analysis import AnalyzeConfig, analyze_run
from .analysis.section import analysis_section
from .data.shapes import MANIFEST, PARTS, generate_shapes_world, read_world_manifest
from .engine import TrainConfig
from .engine.checkpoint import CURVES_FILE
from .fileio import read_json, write_json
from .report import Section, write_report
from .retrieval.build import BuildConfig, build_index
from .retrieval.embed import EmbedConfig
from .retrieval.encoder import load_encoder
from .retrieval.evaluate import CategoryTable, RelevanceRule, evaluate_coco
from .retrieval.gallery import render_gallery
from .retrieval.items import coco_items
from .retrieval.search import search
from .runs import PRETRAIN_DIR, PRETRAINED_FILE as CHECKPOINT, RESULTS_FILE, STAGE1_DIR, STAGE2_DIR
from .tasks.cir import CIRSettings, train_cirr
from .tasks.cir.metrics import RECALL_KS, SUBSET_KS
from .tasks.classify import ClassifySettings, train_classifier
from .tasks.classify.settings import default_adapter_config, default_train_config
from .tasks.pretrain import PretrainSettings, is_pretrained, pretrain


@dataclass
class DemoSettings:
    """Sizes and budgets of the demo; ``smoke()`` is the smallest end-to-end version (tests)."""

    out: str = "demo"
    world: str = "small"
    arch: str = "mora-tiny"
    seed: int = 0
    pretrain_epochs: int = 16
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    cir_epochs: int = 8
    cir_batch: int = 32
    full_lr: float = 1e-4  # full fine-tuning's stage-1 lr on this world (see the module docstring)
    combiner_epochs: int = 10
    classify_epochs: int = 10
    classify_batch: int = 64
    analysis_samples: int = 200
    workers: int = 1

    @classmethod
    def smoke(cls, out: str) -> "DemoSettings":
        """The tiny world; pretraining long enough (30 short epochs) that the CIR models beat chance."""
        return cls(out=out, world="tiny", pretrain_epochs=30, pretrain_batch=32, cir_epochs=2, cir_batch=8,
                   combiner_epochs=2, classify_epochs=5, classify_batch=16, workers=0)


def _log(console, message: str) -> None:
    if console is not None:
        console.print(message)


def coco_chance(folder: Any, rule: Any, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected Recall@K (percent) of a random ranking (docs/protocols.md §5), averaged over the queries with a
    relevant image: a query with m relevant images among the n - 1 others misses all of them in K random draws
    with the hypergeometric probability C(n - 1 - m, K) / C(n - 1, K)."""
    table = CategoryTable.from_items(folder.items)
    rel = table.relevance(np.arange(folder.count), rule)
    np.fill_diagonal(rel, False)
    m = rel.sum(axis=1)
    m = m[m > 0]
    others = folder.count - 1
    return {f"R@{k}": float(100.0 * (1.0 - hypergeom.pmf(0, others, m, min(k, others))).mean()) if len(m) else math.nan
            for k in ks}


def _world(settings: DemoSettings, console) -> dict[str, Path]:
    root = Path(settings.out) / "world"
    if (root / MANIFEST).is_file():
        manifest = read_world_manifest(root)
        if manifest.get("size") == settings.world and manifest.get("seed") == settings.seed:
            _log(console, f"[dim]shapes world: reusing {root}[/]")
            return {part: root / part for part in PARTS}
    _log(console, f"shapes world ({settings.world}) -> {root}")
    return generate_shapes_world(root, size=settings.world, seed=settings.seed)


def _pretrain(settings: DemoSettings, world: dict[str, Path], console, quiet: bool) -> Path:
    run = Path(settings.out) / "pretrain"
    spec = PretrainSettings(
        run_dir=str(run), arch=settings.arch, coco_root=str(world["coco"]),
        train=TrainConfig(epochs=settings.pretrain_epochs, batch_size=settings.pretrain_batch, lr=settings.pretrain_lr,
                          weight_decay=0.1, seed=settings.seed, num_workers=settings.workers, log_every=10),
    )
    if is_pretrained(run, spec):
        _log(console, f"[dim]pretraining: reusing {run / CHECKPOINT}[/]")
        return run / CHECKPOINT
    if run.exists():
        shutil.rmtree(run)
    _log(console, f"pretraining {settings.arch} contrastively on the COCO-format captions -> {run}")
    pretrain(spec, console=console, quiet=quiet)
    return run / CHECKPOINT


def _train_cir(settings: DemoSettings, world, checkpoint: Path, method: str, console, quiet: bool) -> dict:
    run = Path(settings.out) / "runs" / f"cir-{method}"
    cir = CIRSettings.with_defaults(str(world["cirr"]), str(run), method, arch=settings.arch,
                                    pretrained=str(checkpoint))
    common = {"seed": settings.seed, "num_workers": settings.workers, "log_every": 10, "batch_size": settings.cir_batch}
    lr = {"lr": settings.full_lr} if method == "full" else {}
    cir.stage1 = replace(cir.stage1, epochs=settings.cir_epochs, **lr, **common)
    cir.stage2 = replace(cir.stage2, epochs=settings.combiner_epochs, lr=1e-3, **common)
    _log(console, f"{CIR_LABELS[method]} -> {run}")
    return {**train_cirr(cir, console=console, quiet=quiet), "run": str(run)}


#: The COCO-format evaluation: relevance rule and query modes (the text is missing in both).
RELEVANCE, COCO_MODES = "exact", ("image", "cir")


def _index_and_eval(name: str, world, encoder_kwargs: dict, settings: DemoSettings) -> dict:
    encoder = load_encoder(settings.arch, **encoder_kwargs)
    out = Path(settings.out) / "indexes" / name  # run_demo emptied indexes/ first
    embed = EmbedConfig(batch_size=256, workers=settings.workers)
    built = build_index(encoder, coco_items(world["coco"], "val2017"), out, BuildConfig(embed=embed),
                        collection={"dataset": "coco", "split": "val2017", "root": str(world["coco"])})
    evaluation = evaluate_coco(built.folder, RelevanceRule.parse(RELEVANCE), RELEVANCE, COCO_MODES, encoder=encoder,
                               embed=embed)
    result = {mode: evaluation.results[mode].to_json() for mode in COCO_MODES}
    return {"index": str(out), "folder": built.folder, "encoder": encoder, "coco": result}


def _classify(settings: DemoSettings, world, checkpoint: Path, console, quiet: bool) -> dict:
    run = Path(settings.out) / "runs" / "classify-food101"
    spec = ClassifySettings(dataset="food101", data_root=str(world["food101"]), arch=settings.arch,
                            pretrained=str(checkpoint), adapter=default_adapter_config("food101", "mora"),
                            missing="both:0.7")
    train = default_train_config("food101", epochs=settings.classify_epochs, batch_size=settings.classify_batch,
                                 seed=settings.seed, num_workers=settings.workers, log_every=10)
    _log(console, f"missing-modality classification (Food-101 format, both:0.7, MoRA) -> {run}")
    return {**train_classifier(spec, train, run, console=console, quiet=quiet), "run": str(run)}


def run_demo(settings: DemoSettings, console=None, quiet: bool = False) -> dict[str, Any]:
    """Run every step; write ``<out>/results.json`` and ``<out>/report.html``; return ``{"json": the results,
    "chance_note", "report": its path, "serve_command"}``."""
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    ends = {"start": time.perf_counter()}  # when each step ended
    world = _world(settings, console)
    ends["world"] = time.perf_counter()
    for stale in ("runs", "indexes"):
        if (out / stale).exists():
            shutil.rmtree(out / stale)
    checkpoint = _pretrain(settings, world, console, quiet)
    ends["pretrain"] = time.perf_counter()
    cir = {method: _train_cir(settings, world, checkpoint, method, console, quiet) for method in CIR_LABELS}
    ends["cir"] = time.perf_counter()
    retrieval = {"pretrained (no CIR training)": _index_and_eval("pretrained", world, {"pretrained": str(checkpoint)},
                                                                 settings)}
    for method, label in CIR_LABELS.items():
        retrieval[label] = _index_and_eval(f"cir-{method}", world, {"run": cir[method]["run"]}, settings)
    ends["index+eval"] = time.perf_counter()
    classify = _classify(settings, world, checkpoint, console, quiet)
    ends["classify"] = time.perf_counter()
    _log(console, f"embedding analysis of the classification run (up to {settings.analysis_samples} test samples)")
    config = AnalyzeConfig(max_samples=settings.analysis_samples, num_workers=settings.workers)
    analysis = analyze_run(classify["run"], config=config, console=None if quiet else console)
    ends["analysis"] = time.perf_counter()

    val = read_json(world["cirr"] / "image_splits" / "split.rc2.val.json", "CIRR split")
    first = read_json(world["cirr"] / "captions" / "cap.rc2.val.json", "CIRR captions")[0]
    query_image = world["cirr"] / val[first["reference"]]
    mora_index = retrieval["CLIP4CIR + MoRA"]
    hits = search(mora_index["folder"], mora_index["encoder"], image=query_image, text=first["caption"], k=8)
    ends["search"] = time.perf_counter()
    query = {"image": str(query_image), "text": first["caption"],
             "hits": [{"rank": h.rank, "score": h.score, "path": h.item.path} for h in hits]}

    timings = {step: end - start for (_, start), (step, end) in pairwise(ends.items())}
    data = _results(settings, len(val), cir, retrieval, classify, query, timings)
    data["analysis"] = str(analysis.files["json"])
    write_json(out / RESULTS_FILE, data)
    note = chance_note(data["not_above_chance"])
    report = _write_report(out / "report.html", data, note, cir, classify, checkpoint, hits,
                           analysis_section(analysis.data, analysis.out_dir))
    return {"json": data, "chance_note": note, "report": str(report),
            "serve_command": f"mora-ret serve --index {mora_index['index']}"}


#: The CIR models the demo trains, in report order.
CIR_LABELS = {"full": "CLIP4CIR (full)", "lora": "CLIP4CIR + LoRA", "mora": "CLIP4CIR + MoRA"}


def cir_verdict(cir: dict[str, dict], full_lr: float) -> str:
    """What the CIRR val ``avg`` figures show, MoRA against each baseline, summed and with the Combiner."""
    parts = []
    for other, name in (("lora", "LoRA (same rank, same budget)"), ("full", f"full fine-tuning (lr {full_lr:g})")):
        for key, how in (("val_stage1", "summed features"), ("val_combiner", "Combiner")):
            mine, theirs = cir["mora"][key]["avg"], cir[other][key]["avg"]
            word = "higher than" if mine > theirs else ("lower than" if mine < theirs else "equal to")
            parts.append(f"{how}: MoRA {mine:.2f} is {word} {name} {theirs:.2f}")
    text = ("CIRR val avg on this world (one seed, one small synthetic world; it says nothing about real data): "
            + "; ".join(parts) + ".")
    if any("lower than LoRA" in part for part in parts):
        text += (" MoRA's adapted weight starts near 2·W0, as in the paper; the README (Method and protocol choices) "
                 "shows what the w/ W0 ablation, --adapter subtract_base, does on this world.")
    return text


def chance_note(below: list[str]) -> str:
    """One sentence on the metrics that do not beat chance (``not_above_chance`` of ``results.json``)."""
    if not below:
        return "Every model beats chance on every metric that chance does not already score 100 on."
    return "Not above chance: " + "; ".join(below) + "."


def _results(settings, gallery_size: int, cir, retrieval, classify, query: dict, timings: dict) -> dict[str, Any]:
    """The content of ``results.json``: every table with its chance levels, the verdicts and the search."""
    cirr_chance = {f"recall@{k}": 100.0 * min(k, gallery_size - 1) / (gallery_size - 1) for k in RECALL_KS}
    cirr_chance.update({f"recall_subset@{k}": 100.0 * k / 5 for k in SUBSET_KS})
    cirr_chance["avg"] = (cirr_chance["recall@5"] + cirr_chance["recall_subset@1"]) / 2
    cirr_rows = {f"{label}, {stage}": cir[method][key] for method, label in CIR_LABELS.items()
                 for stage, key in (("summed features", "val_stage1"), ("Combiner", "val_combiner"))}
    coco_rows = {f"{label} ({mode} query)": entry["coco"][mode]["recall"]
                 for label, entry in retrieval.items() for mode in COCO_MODES}
    any_index = next(iter(retrieval.values()))
    coco_chance_row = coco_chance(any_index["folder"], RelevanceRule.parse(RELEVANCE))
    below = [f"{name}: {metric}" for rows, chance in ((cirr_rows, cirr_chance), (coco_rows, coco_chance_row))
             for name, metrics in rows.items() for metric, value in metrics.items()
             if metric in chance and chance[metric] < 100.0 and not value > chance[metric]]
    if classify["test_metric"] <= classify["majority_baseline"]:
        below.append(f"classification: {classify['metric']}")
    coco_queries = any_index["coco"]["image"]
    return {
        "settings": settings.__dict__,
        "timings_s": timings,
        "total_s": sum(timings.values()),
        "cirr_val": cirr_rows,
        "cirr_chance": cirr_chance,
        "coco_i2i": coco_rows,
        "coco_chance": coco_chance_row,
        "coco_queries": {"evaluated": coco_queries["evaluated_queries"],
                         "without_relevant": coco_queries["queries_without_relevant"]},
        "classification": {"dataset": "food101", "scenario": classify["scenario"], "metric": classify["metric"],
                           "test": classify["test_metric"], "majority_baseline": classify["majority_baseline"]},
        "search": query,
        "trainable_percent": {m: cir[m]["trainable_percent"] for m in cir},
        "verdict": cir_verdict(cir, settings.full_lr),
        "not_above_chance": below,
    }


def _write_report(path: Path, data: dict, chance_note_text: str, cir, classify, checkpoint, hits, analysis) -> Path:
    overview = Section("Overview", notes=[
        f"Every figure below was measured by this run ({data['total_s']:.0f} s in all; steps: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["timings_s"].items()) + ").",
        data["verdict"],
        chance_note_text,
        "Trainable share of the CIR models: " + ", ".join(
            f"{method} {share:.3f}%" for method, share in data["trainable_percent"].items()) + ".",
    ])
    cirr = Section("CIRR-format validation (composed image retrieval)",
                   notes=["Recall@K with the reference removed; Recall_subset@K within the 5 other members of the "
                          "query's image set; avg = (R@5 + Rs@1) / 2."])
    cirr.metrics("CIRR val (percent)", list(data["cirr_chance"]), {**data["cirr_val"], "chance": data["cirr_chance"]})
    coco = Section("COCO-format image-to-image retrieval (the text is missing)",
                   notes=[f"Relevance '{RELEVANCE}' (same category set); {data['coco_queries']['evaluated']} queries "
                          f"evaluated, {data['coco_queries']['without_relevant']} had no relevant image and were "
                          "left out. Mode 'image': image embedding; 'cir': composed query with an empty caption."])
    coco.metrics("Recall@K (percent)", list(data["coco_chance"]), {**data["coco_i2i"], "chance": data["coco_chance"]})
    result = data["classification"]
    cls = Section("Missing-modality classification (Food-101 format)",
                  notes=[f"Train/val/test scenarios: {result['scenario']}; metric {result['metric']} on the "
                         "merged model; chance = the majority-class baseline."])
    cls.table("Test", ["model", result["metric"], "majority baseline"],
              [["MoRA (merged)", result["test"], result["majority_baseline"]]])
    curves = Section("Training curves")
    curves.images.append(("contrastive pretraining", Path(checkpoint).parent / PRETRAIN_DIR / CURVES_FILE))
    for method in CIR_LABELS:
        run = Path(cir[method]["run"])
        curves.images.append((f"CIR {method}: stage 1", run / STAGE1_DIR / CURVES_FILE))
        curves.images.append((f"CIR {method}: Combiner", run / STAGE2_DIR / CURVES_FILE))
    curves.images.append(("classification", Path(classify["run"]) / CURVES_FILE))
    query = data["search"]
    gallery = Section("A composed search", notes=[f"Query: {query['image']} + \"{query['text']}\" against the "
                                                  "CLIP4CIR + MoRA index of the COCO-format val images."])
    gallery.embedded_pages.append(render_gallery(hits, image=query["image"], text=query["text"],
                                                 title="composed search"))
    return write_report(path, "mora-retrieval demo: the shapes world", [overview, cirr, coco, cls, analysis, curves,
                                                                              gallery])
