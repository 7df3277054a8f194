"""``analyze_run``: every measure of the analysis for one finished run, written to a folder.

Output folder (default ``<run>/analysis``): ``analysis.json`` (every number, see
:func:`analyze_run`), ``tsne.png``, ``spectra.png`` (methods with a shared part only) and
``analysis.html`` (the section the demo report embeds, as a page of its own).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..adapters.io import read_adapter_config
from ..errors import MoraError
from ..fileio import check_can_create, write_json
from ..model.backbone import weights_fingerprint
from ..report import write_report
from .figures import ScatterPanel, plot_scatter_grid, plot_spectra
from .geometry import category_members, embedding_drift, inter_modal_distance, modality_gap
from .runs import DEFAULT_SPLIT, image_transform, read_run, run_samples
from .samples import Embeddings, PairedSamples, encode_samples, spread_indices
from .section import analysis_section
from .spectra import read_shared_factors, slot_spectra
from .tsne import MIN_POINTS, default_perplexity, tsne_2d

FORMAT = "mora-retrieval-analysis"
JSON_FILE, HTML_FILE, TSNE_FILE, SPECTRA_FILE = "analysis.json", "analysis.html", "tsne.png", "spectra.png"
MODELS = ("original", "adapted")


@dataclass
class AnalyzeConfig:
    """Options of :func:`analyze_run`; ``split=None`` is the run's test split (CIR: CIRR ``val``)."""

    split: str | None = None
    max_samples: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    data_root: str | None = None
    tsne_seed: int = 0

    def validate(self) -> None:
        if self.max_samples is not None and self.max_samples < MIN_POINTS:
            raise MoraError(f"--max-samples must be at least {MIN_POINTS} (t-SNE needs that many), "
                            f"got {self.max_samples}")
        if self.batch_size < 1:
            raise MoraError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise MoraError(f"--workers must be >= 0, got {self.num_workers}")


@dataclass
class AnalysisResult:
    """``data`` is ``analysis.json``'s content; ``files`` maps a name to each file written."""

    data: dict[str, Any]
    out_dir: Path
    files: dict[str, Path]


def geometry(samples: PairedSamples, embeddings: dict[str, Embeddings]) -> dict[str, Any]:
    """Inter-modal distance (with categories), modality gap and drift of ``embeddings`` (original, adapted)."""
    adapted, original = embeddings["adapted"], embeddings["original"]
    return {
        "inter_modal": None if samples.labels is None else {
            m: {variant: asdict(inter_modal_distance(embeddings[m].image[samples.pair_image], embeddings[m].text,
                                                     samples.labels, normalize=variant == "normalized"))
                for variant in ("raw", "normalized")}
            for m in MODELS},
        "modality_gap": {m: modality_gap(embeddings[m].image, embeddings[m].text) for m in MODELS},
        "drift": {"vision": asdict(embedding_drift(adapted.image, original.image)),
                  "text": asdict(embedding_drift(adapted.text, original.text))},
    }


def tsne_groups(samples: PairedSamples) -> np.ndarray:
    """The class of each sample for colouring: its index; multilabel: the first label (−1: none)."""
    members = category_members(samples.labels).numpy()
    return np.where(members.any(axis=1), members.argmax(axis=1), -1)


def analyze_run(run_dir: str | Path, out_dir: str | Path | None = None, config: AnalyzeConfig | None = None,
                console: Any = None) -> AnalysisResult:
    """Analyse a finished classification or CIR run against its original backbone; every input is checked (run
    folder, split, data, both models) before anything is written."""
    config = config or AnalyzeConfig()
    config.validate()
    info = read_run(run_dir)
    run = info.run
    split = config.split or DEFAULT_SPLIT[run.task]
    samples = run_samples(info, split, config.data_root)
    total = len(samples)
    samples = samples.select(spread_indices(total, config.max_samples))
    out = check_can_create(out_dir if out_dir is not None else run.path / "analysis", "folder for --out")
    device = str(resolve_device(config.device))
    models = {"adapted": run.load_model(device), "original": run.load_base(device)}
    _say(console, f"encoding {len(samples)} {split} samples ({len(samples.image_paths)} images) with the adapted and "
                  f"the original model on {device}")
    samples, embeddings = encode_samples(models, samples, image_transform(info, models["adapted"]),
                                         config.batch_size, config.num_workers, info.skip_bad_images)
    data: dict[str, Any] = {
        "format": FORMAT, "format_version": 1,
        "run": str(run.path.resolve()), "task": run.task, "dataset": info.dataset, "method": info.adapter.method,
        "arch": run.arch, "pretrained": run.pretrained, "split": split,
        "original": {"arch": run.arch, "pretrained": run.pretrained, "seed": None if run.pretrained else run.seed,
                     "fingerprint": weights_fingerprint(models["original"].model)},
        "samples": {"available": total, "pairs": len(samples), "images": len(samples.image_paths),
                    "categories": None if samples.labels is None else len(samples.class_names),
                    "complete": True},
        "embeddings": "raw encode_image/encode_text outputs; 'normalized' variants L2-normalise each embedding first",
        **_checked(geometry, info, samples, embeddings),
        "notes": [],
    }
    if data["inter_modal"] is None:
        data["notes"].append("No inter-modal distance per category: CIRR has no categories, and its captions are "
                             "modification instructions, not descriptions of the reference image. The modality gap "
                             "is the whole-set counterpart.")
    spectra = _spectra(info, models["original"].model, data)
    panels = _tsne(samples, embeddings, config.tsne_seed, data, console)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    if spectra:
        figures["spectra"] = plot_spectra(spectra, out / SPECTRA_FILE)
    if panels is not None:
        figures["tsne"] = plot_scatter_grid(panels, out / TSNE_FILE,
                                            f"t-SNE of the {split} embeddings ({info.adapter.method}, {info.dataset})")
    data["figures"] = {name: path.name for name, path in figures.items()}
    write_json(out / JSON_FILE, data)
    html = write_report(out / HTML_FILE, f"Analysis of {run.path.name}", [analysis_section(data, out)])
    return AnalysisResult(data=data, out_dir=out, files={"json": out / JSON_FILE, **figures, "html": html})


def _checked(compute, info, *args):
    """``compute(*args)``; a degenerate embedding (NaN, zero) becomes a one-line error naming the run."""
    try:
        return compute(*args)
    except ValueError as exc:
        raise MoraError(f"{info.run.path}: cannot analyse its embeddings ({exc})") from None


def _spectra(info, original_model: Any, data: dict[str, Any]) -> list:
    """The Gram spectra of the run's adapter (empty without a shared part); fills ``data["spectra"]``."""
    factors = read_shared_factors(info.adapter_dir)
    method, targets = info.adapter.method, info.adapter.targets
    slot_blocks = read_adapter_config(info.adapter_dir).get("slots") or []
    spectra = _checked(slot_spectra, info, factors, original_model, targets, slot_blocks) if factors else []
    data["spectra"] = {"available": bool(spectra), "method": method, "targets": list(targets),
                       "slots": [asdict(s) for s in spectra]}
    if not spectra:
        data["notes"].append(f"No Gram spectra: method '{method}' has no shared part (only MoRA and its "
                             "ablations have shared factors S_v, S_t).")
    return spectra


def _tsne(samples: PairedSamples, embeddings: dict[str, Embeddings], seed: int, data: dict[str, Any],
          console: Any) -> list | None:
    """The t-SNE panels, each tower coloured by class; without classes, the images and captions of each model
    together. None with too few samples. Fills ``data["tsne"]``."""
    if len(samples) < MIN_POINTS:
        data["tsne"] = None
        data["notes"].append(f"No t-SNE: fewer than {MIN_POINTS} samples.")
        return None
    _say(console, "t-SNE")
    if samples.labels is not None:
        colour, points, groups = "class", len(samples), tsne_groups(samples)
        panels = [[ScatterPanel(f"{m}: {tower} embeddings", tsne_2d(getattr(embeddings[m], tower), seed), groups,
                                samples.class_names) for m in MODELS] for tower in ("image", "text")]
    else:
        colour, points = "modality", len(samples.image_paths) + len(samples)
        groups = np.repeat(np.array([0, 1], dtype=np.int64), [len(samples.image_paths), len(samples)])
        both = {m: torch.cat([embeddings[m].image, embeddings[m].text]) for m in MODELS}
        panels = [[ScatterPanel(f"{m}: images and captions", tsne_2d(both[m], seed), groups,
                                ["reference image", "caption"]) for m in MODELS]]
    data["tsne"] = {"colour": colour, "seed": seed, "features": "L2-normalised", "points_per_panel": points,
                    "perplexity": default_perplexity(points)}
    return panels


def _say(console: Any, message: str) -> None:
    if console is not None:
        console.print(f"[dim]{message}[/]")
