"""The embedded default: the whole pipeline on the generated shapes world, no download needed.

``run_demo`` (``mora-ret demo``):

1. writes the shapes world (all five published layouts) unless the same one is there;
2. pretrains a small CLIP on its COCO-format captions, from scratch, with the ordinary
   contrastive objective (``mora-ret pretrain``), cached: a second run reuses it;
3. trains CLIP4CIR with three encoder updates on the CIRR-format part, under the same budget
   (epochs, batch, Combiner): MoRA, LoRA (same rank and targets, the recipe's lr) and ``full``
   fine-tuning at ``full_lr`` (CLIP4CIR's published 2e-6 barely moves a model pretrained from
   scratch on this world in a few epochs, so it would not be a baseline), then merges;
4. builds a FAISS index of the COCO-format val images for the pretrained model and the CIR
   models, and evaluates image-to-image Recall@1/5/10 (text missing) and the CIRR metrics;
5. trains and tests a missing-modality classifier (MoRA, Food-101 format, ``both:0.7``) and
   analyses its embedding space against the pretrained model (``mora-ret analyze``);
6. runs one composed search (a CIRR val reference + its caption) against the MoRA index;
7. prints a results table and writes ``report.html`` with the tables, chance levels, training
   curves and the search gallery.

Every figure comes from the run. Chance levels: CIRR Recall@K = min(K, gallery − 1) / (gallery − 1),
Recall_subset@K = K / 5; COCO Recall@K = the exact probability that a random ranking puts a
relevant image in the top K, averaged over the evaluated queries; classification = the
majority-class baseline on the test set.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .analysis import AnalyzeConfig, analyze_run
from .data.shapes import PARTS, generate_shapes_world, read_world_manifest
from .engine import TrainConfig
from .engine.checkpoint import curves_path
from .fileio import read_json, write_json
from .report import Section, rows_from_metrics, write_report
from .retrieval.build import BuildConfig, build_index
from .retrieval.embed import EmbedConfig
from .retrieval.encoder import load_encoder
from .retrieval.evaluate import CategoryTable, RelevanceRule, evaluate_coco
from .retrieval.gallery import render_gallery
from .retrieval.items import coco_items
from .retrieval.search import search
from .runs import PRETRAIN_DIR, PRETRAINED_FILE as CHECKPOINT, RESULTS_FILE, STAGE1_DIR, STAGE2_DIR
from .tasks.cir import CIRSettings, train_cirr
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


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps: dict[str, float] = {}
        self._last = self.start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.steps[name] = now - self._last
        self._last = now
        return self.steps[name]


def coco_chance(folder: Any, rule: Any, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected Recall@K (percent) of a random ranking under the protocol of docs/protocols.md §5."""
    table = CategoryTable.from_items(folder.items)
    n = folder.count
    rel = table.relevance(np.arange(n), rule)
    np.fill_diagonal(rel, False)
    m = rel.sum(axis=1)
    m = m[m > 0]
    others = n - 1
    out = {}
    for k in ks:
        # 1 - C(others - m, k) / C(others, k), computed as a product to stay in floating point.
        miss = np.ones_like(m, dtype=np.float64)
        for j in range(min(k, others)):
            miss *= np.clip((others - m - j) / (others - j), 0.0, None)
        out[f"R@{k}"] = float(100.0 * (1.0 - miss).mean()) if len(m) else math.nan
    return out


def _world(settings: DemoSettings, console) -> dict[str, Path]:
    root = Path(settings.out) / "world"
    if (root / "shapes_world.json").is_file():
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
    common = {"seed": settings.seed, "num_workers": settings.workers, "log_every": 10}
    lr = {"lr": settings.full_lr} if method == "full" else {}
    cir.stage1 = TrainConfig(**{**cir.stage1.to_dict(), "epochs": settings.cir_epochs,
                                "batch_size": settings.cir_batch, **lr, **common})
    cir.stage2 = TrainConfig(**{**cir.stage2.to_dict(), "epochs": settings.combiner_epochs,
                                "batch_size": settings.cir_batch, "lr": 1e-3, **common})
    _log(console, f"{CIR_LABELS[method]} -> {run}")
    results = train_cirr(cir, console=console, quiet=quiet)
    results["run"] = str(run)
    return results


def _index_and_eval(name: str, world, encoder_kwargs: dict, settings: DemoSettings) -> dict:
    encoder = load_encoder(settings.arch, **encoder_kwargs)
    out = Path(settings.out) / "indexes" / name
    if out.exists():
        shutil.rmtree(out)
    items = coco_items(world["coco"], "val2017")
    built = build_index(encoder, items, out, BuildConfig(embed=EmbedConfig(batch_size=256, workers=settings.workers)),
                        collection={"dataset": "coco", "split": "val2017", "root": str(world["coco"])})
    rule = RelevanceRule.parse("exact")
    modes = ("image", "cir")
    evaluation = evaluate_coco(built.folder, rule, "exact", modes, encoder=encoder,
                               embed=EmbedConfig(batch_size=256, workers=settings.workers))
    result = {mode: evaluation.results[mode].to_json() for mode in modes}
    return {"index": str(out), "folder": built.folder, "encoder": encoder, "coco": result, "rule": rule}


def _classify(settings: DemoSettings, world, checkpoint: Path, console, quiet: bool) -> dict:
    run = Path(settings.out) / "runs" / "classify-food101"
    spec = ClassifySettings(dataset="food101", data_root=str(world["food101"]), arch=settings.arch,
                            pretrained=str(checkpoint), adapter=default_adapter_config("food101", "mora"),
                            missing="both:0.7")
    train = default_train_config("food101", epochs=settings.classify_epochs, batch_size=settings.classify_batch,
                                 seed=settings.seed, num_workers=settings.workers, log_every=10)
    _log(console, f"missing-modality classification (Food-101 format, both:0.7, MoRA) -> {run}")
    results = train_classifier(spec, train, run, console=console, quiet=quiet)
    results["run"] = str(run)
    return results


def _analyze(settings: DemoSettings, classify: dict, console, quiet: bool):
    _log(console, f"embedding analysis of the classification run (up to {settings.analysis_samples} test samples)")
    config = AnalyzeConfig(max_samples=settings.analysis_samples, num_workers=settings.workers)
    return analyze_run(classify["run"], config=config, console=None if quiet else console)


def run_demo(settings: DemoSettings, console=None, quiet: bool = False) -> dict[str, Any]:
    """Run every step; return the results and write ``<out>/report.html`` and ``<out>/results.json``."""
    torch.manual_seed(settings.seed)
    out = Path(settings.out)
    clock = _Clock()
    world = _world(settings, console)
    clock.lap("world")
    for stale in ("runs", "indexes"):
        if (out / stale).exists():
            shutil.rmtree(out / stale)
    checkpoint = _pretrain(settings, world, console, quiet)
    clock.lap("pretrain")
    cir = {method: _train_cir(settings, world, checkpoint, method, console, quiet) for method in CIR_LABELS}
    clock.lap("cir")
    retrieval = {"pretrained (no CIR training)": _index_and_eval("pretrained", world, {"pretrained": str(checkpoint)},
                                                                 settings)}
    for method, label in CIR_LABELS.items():
        retrieval[label] = _index_and_eval(f"cir-{method}", world, {"run": cir[method]["run"]}, settings)
    clock.lap("index+eval")
    classify = _classify(settings, world, checkpoint, console, quiet)
    clock.lap("classify")
    analysis = _analyze(settings, classify, console, quiet)
    clock.lap("analysis")

    val = read_json(world["cirr"] / "image_splits" / "split.rc2.val.json", "CIRR split")
    first = read_json(world["cirr"] / "captions" / "cap.rc2.val.json", "CIRR captions")[0]
    query_image = world["cirr"] / val[first["reference"]]
    mora_index = retrieval["CLIP4CIR + MoRA"]
    hits = search(mora_index["folder"], mora_index["encoder"], image=query_image, text=first["caption"], k=8)
    clock.lap("search")

    summary = _summarise(settings, world, cir, retrieval, classify, query_image, first["caption"], hits, clock)
    summary["json"]["analysis"] = str(analysis.files["json"])
    write_json(out / RESULTS_FILE, summary["json"])
    report = _write_report(out / "report.html", summary, cir, retrieval, classify, checkpoint, query_image,
                           first["caption"], hits, analysis.section())
    summary["report"] = str(report)
    summary["serve_command"] = f"mora-ret serve --index {mora_index['index']}"
    return summary


#: The CIR models the demo trains, in report order.
CIR_LABELS = {"full": "CLIP4CIR (full)", "lora": "CLIP4CIR + LoRA", "mora": "CLIP4CIR + MoRA"}


def cir_verdict(cir: dict[str, dict], full_lr: float) -> str:
    """What the CIRR val ``avg`` figures show, MoRA against each baseline, summed and with the Combiner."""
    parts = []
    for other, name in (("lora", "LoRA (same rank, same budget)"), ("full", f"full fine-tuning (lr {full_lr:g})")):
        for key, how in (("val_stage1", "summed features"), ("val_combiner", "Combiner")):
            if key not in cir["mora"] or key not in cir[other]:
                continue
            mine, theirs = cir["mora"][key]["avg"], cir[other][key]["avg"]
            word = "higher than" if mine > theirs else ("lower than" if mine < theirs else "equal to")
            parts.append(f"{how}: MoRA {mine:.2f} is {word} {name} {theirs:.2f}")
    return ("CIRR val avg on this world (one seed, one small synthetic world; it says nothing about real data): "
            + "; ".join(parts) + ".")


def _summarise(settings, world, cir, retrieval, classify, query_image, caption, hits, clock) -> dict[str, Any]:
    gallery = len(read_json(world["cirr"] / "image_splits" / "split.rc2.val.json", "CIRR split"))
    cirr_chance = {f"recall@{k}": 100.0 * min(k, gallery - 1) / (gallery - 1) for k in (1, 5, 10, 50)}
    cirr_chance.update({f"recall_subset@{k}": 100.0 * k / 5 for k in (1, 2, 3)})
    cirr_chance["avg"] = (cirr_chance["recall@5"] + cirr_chance["recall_subset@1"]) / 2
    cirr_rows = {}
    for method, label in CIR_LABELS.items():
        cirr_rows[f"{label}, summed features"] = cir[method]["val_stage1"]
        cirr_rows[f"{label}, Combiner"] = cir[method]["val_combiner"]
    coco_rows = {}
    any_folder = next(iter(retrieval.values()))
    coco_chance_row = coco_chance(any_folder["folder"], any_folder["rule"])
    for label, entry in retrieval.items():
        for mode in ("image", "cir"):
            coco_rows[f"{label} ({mode} query)"] = entry["coco"][mode]["recall"]
    evaluated = any_folder["coco"]["image"]["evaluated_queries"]
    no_relevant = any_folder["coco"]["image"]["queries_without_relevant"]
    metric = classify["metric"]
    json_out = {
        "settings": settings.__dict__,
        "timings_s": clock.steps,
        "total_s": sum(clock.steps.values()),
        "cirr_val": cirr_rows,
        "cirr_chance": cirr_chance,
        "coco_i2i": coco_rows,
        "coco_chance": coco_chance_row,
        "coco_queries": {"evaluated": evaluated, "without_relevant": no_relevant},
        "classification": {"dataset": "food101", "scenario": classify["scenario"], "metric": metric,
                           "test": classify["test_metric"], "majority_baseline": classify["majority_baseline"]},
        "search": {"image": str(query_image), "text": caption,
                   "hits": [{"rank": h.rank, "score": h.score, "path": h.item.path} for h in hits]},
        "trainable_percent": {m: cir[m]["trainable_percent"] for m in cir},
    }
    verdict = cir_verdict(cir, settings.full_lr)
    json_out["verdict"] = verdict
    below = [f"{name}: {metric}" for rows, chance in ((cirr_rows, cirr_chance), (coco_rows, coco_chance_row))
             for name, metrics in rows.items() for metric, value in metrics.items()
             if metric in chance and chance[metric] < 100.0 and not value > chance[metric]]
    if classify["test_metric"] <= classify["majority_baseline"]:
        below.append(f"classification: {metric}")
    json_out["not_above_chance"] = below
    chance_note = ("Every model beats chance on every metric that chance does not already score 100 on."
                   if not below else "Not above chance: " + "; ".join(below) + ".")
    return {"json": json_out, "cirr_rows": cirr_rows, "cirr_chance": cirr_chance, "coco_rows": coco_rows,
            "coco_chance": coco_chance_row, "verdict": verdict, "chance_note": chance_note}


def _write_report(path: Path, summary, cir, retrieval, classify, checkpoint, query_image, caption, hits,
                  analysis) -> Path:
    data = summary["json"]
    cirr_cols = ["recall@1", "recall@5", "recall@10", "recall@50", "recall_subset@1", "recall_subset@2",
                 "recall_subset@3", "avg"]
    overview = Section("Overview", notes=[
        f"Every figure below was measured by this run ({data['total_s']:.0f} s in all; steps: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in data["timings_s"].items()) + ").",
        summary["verdict"],
        summary["chance_note"],
        "Trainable share of the CIR models: " + ", ".join(
            f"{method} {share:.3f}%" for method, share in data["trainable_percent"].items()) + ".",
    ])
    cirr = Section("CIRR-format validation (composed image retrieval)",
                   notes=["Recall@K with the reference removed; Recall_subset@K within the 5 other members of the "
                          "query's image set; avg = (R@5 + Rs@1) / 2."])
    cirr.table("CIRR val (percent)", ["model", *cirr_cols],
               rows_from_metrics({**summary["cirr_rows"], "chance": summary["cirr_chance"]}, cirr_cols))
    coco = Section("COCO-format image-to-image retrieval (the text is missing)",
                   notes=[f"Relevance 'exact' (same category set); {data['coco_queries']['evaluated']} queries "
                          f"evaluated, {data['coco_queries']['without_relevant']} had no relevant image and were "
                          "left out. Mode 'image': image embedding; 'cir': composed query with an empty caption."])
    coco.table("Recall@K (percent)", ["model", "R@1", "R@5", "R@10"],
               rows_from_metrics({**summary["coco_rows"], "chance": summary["coco_chance"]}, ["R@1", "R@5", "R@10"]))
    cls = Section("Missing-modality classification (Food-101 format)",
                  notes=[f"Train/val/test scenarios: {classify['scenario']}; metric {classify['metric']} on the "
                         "merged model; chance = the majority-class baseline."])
    cls.table("Test", ["model", classify["metric"], "majority baseline"],
              [["MoRA (merged)", classify["test_metric"], classify["majority_baseline"]]])
    curves = Section("Training curves")
    curves.images.append(("contrastive pretraining", curves_path(Path(checkpoint).parent / PRETRAIN_DIR)))
    for method in CIR_LABELS:
        run = Path(cir[method]["run"])
        curves.images.append((f"CIR {method}: stage 1", curves_path(run / STAGE1_DIR)))
        curves.images.append((f"CIR {method}: Combiner", curves_path(run / STAGE2_DIR)))
    curves.images.append(("classification", curves_path(Path(classify["run"]))))
    gallery = Section("A composed search", notes=[f"Query: {query_image} + \"{caption}\" against the CLIP4CIR + MoRA "
                                                  "index of the COCO-format val images."])
    gallery.embedded_pages.append(render_gallery(hits, image=query_image, text=caption, title="composed search"))
    return write_report(path, "mora-retrieval demo: the shapes world", [overview, cirr, coco, cls, analysis, curves,
                                                                              gallery])
