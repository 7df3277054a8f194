"""Finished runs as the analysis sees them: settings, the adapted and the original model, the samples.

This is the only module of :mod:`mora_retrieval.analysis` that imports ``mora_retrieval.tasks``
(the settings classes of classification and CIR runs).

* The **adapted** model is the run's merged checkpoint (``retrieval.encoder.load_encoder(run=…)``);
  for a prompt method (``dcp``, ``mmp``), which cannot be merged, the adapter loaded unmerged onto
  the rebuilt backbone, with every sample complete (the analysis embeds complete samples).
* The **original** model is rebuilt from the run's recorded architecture and pretrained weights;
  an architecture trained without pretrained weights is re-drawn from the run's seed, exactly as
  training drew it. The rebuilt weights are checked against the base-weight fingerprint the
  adapter folder recorded, so the comparison is never made against the wrong backbone.
* The **samples**: a classification run's split (every sample complete: image and text; the
  categories are the classes); a CIR run's CIRR split (each triplet's reference image and
  caption; no categories).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..adapters import get_method, list_methods
from ..adapters.io import CONFIG_FILE as ADAPTER_CONFIG_FILE
from ..data.cirr import CIRRTriplets
from ..data.images import make_transform
from ..data.registry import get_classification_dataset
from ..errors import BackboneError, DataError, TrainingError
from ..fileio import read_json
from ..model.backbone import image_size_of
from ..retrieval.encoder import load_encoder
from ..runs import ADAPTER_DIR, CONFIG_FILE as RUN_CONFIG, MERGED_FILE, read_record
from ..tasks.cir.settings import CIRSettings
from ..tasks.classify.settings import ClassifySettings, read_run_config
from .samples import PairedSamples

CLASSIFY, CIR = "classify", "cir"
SPLITS = {CLASSIFY: ("train", "val", "test"), CIR: ("train", "val", "test1")}
DEFAULT_SPLIT = {CLASSIFY: "test", CIR: "val"}


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs to know about a finished run."""

    run_dir: Path
    task: str
    arch: str
    pretrained: str | None
    seed: int
    method: str
    dataset: str
    data_root: str
    transform: str | None  # CIR's image transform; None: the model's own eval preprocessing
    skip_bad_images: bool
    adapter_dir: Path
    base_fingerprint: str | None

    @property
    def default_split(self) -> str:
        return DEFAULT_SPLIT[self.task]

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS[self.task]


def read_run(run_dir: str | Path) -> RunInfo:
    """Read a finished ``mora-ret classify`` or ``mora-ret train cirr`` run folder (one-line errors)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainingError(f"{run_dir}: run folder not found")
    config = read_record(run_dir, error=TrainingError)
    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    task = config.get("task") or extra.get("task")
    if task == CLASSIFY:
        settings = ClassifySettings.from_dict(read_run_config(run_dir))
        seed = int((config.get("train") or {}).get("seed", 0))
        info = dict(arch=settings.arch, pretrained=settings.pretrained, seed=seed,
                    method=settings.adapter.method, dataset=settings.dataset,
                    data_root=settings.data_root, transform=None, skip_bad_images=settings.skip_bad_images)
    elif task == CIR:
        try:
            settings = CIRSettings.from_dict(config, str(run_dir))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"{run_dir / RUN_CONFIG}: not a valid CIR run config ({exc})") from None
        info = dict(arch=settings.arch, pretrained=settings.pretrained, seed=settings.stage1.seed,
                    method=settings.adapter.method, dataset="cirr", data_root=settings.data_root,
                    transform=settings.transform, skip_bad_images=settings.skip_bad_images)
    else:
        raise TrainingError(f"{run_dir / RUN_CONFIG}: not a classification or CIR run (task {task!r}); analyze "
                            "needs a run folder of `mora-ret classify` or `mora-ret train cirr`")
    adapter_dir = run_dir / ADAPTER_DIR
    unmerged = info["method"] in list_methods() and not get_method(info["method"]).mergeable  # dcp, mmp
    merged = [] if unmerged else [run_dir / MERGED_FILE]
    for needed in (*merged, adapter_dir / ADAPTER_CONFIG_FILE):
        if not needed.is_file():
            raise TrainingError(f"{needed}: not found (the run did not finish; resume it with --resume)")
    meta = read_json(adapter_dir / ADAPTER_CONFIG_FILE, "adapter config", error=TrainingError)
    fingerprint = meta.get("base_fingerprint") if isinstance(meta, dict) else None
    if info["pretrained"] in ("", "none"):
        info["pretrained"] = None
    return RunInfo(run_dir=run_dir, task=task, adapter_dir=adapter_dir, base_fingerprint=fingerprint, **info)


def adapted_encoder(info: RunInfo, device: str | None) -> Any:
    """The run's merged model as a ``retrieval.encoder.Encoder`` (a prompt method's run: its backbone with
    the adapter loaded unmerged, see ``runs.FinishedRun.load_model``)."""
    return load_encoder(None, run=info.run_dir, device=device)


def original_encoder(info: RunInfo, device: str | None) -> Any:
    """The unadapted backbone the run started from, checked against the adapter's base fingerprint."""
    with torch.random.fork_rng():  # random weights come from the run's seed; the global RNGs are restored
        torch.manual_seed(info.seed)
        encoder = load_encoder(info.arch, info.pretrained, device=device)
    if info.base_fingerprint and encoder.fingerprint != info.base_fingerprint:
        weights = info.pretrained or f"random weights from seed {info.seed}"
        raise BackboneError(f"{info.adapter_dir}: the run started from base weights {info.base_fingerprint}, but "
                            f"{info.arch} with {weights} gives {encoder.fingerprint} (the pretrained file changed?)")
    return encoder


def run_samples(info: RunInfo, split: str, data_root: str | None = None) -> PairedSamples:
    """The image–text samples of ``split`` (see the module docstring)."""
    if split not in info.splits:
        raise DataError(f"--split {split!r}: a {info.task} run has the splits {', '.join(info.splits)}")
    root = data_root or info.data_root
    if info.task == CLASSIFY:
        data = get_classification_dataset(info.dataset, root, split, transform=None,
                                          skip_bad_images=info.skip_bad_images)
        if len(data) == 0:
            raise DataError(f"{root}: the {split} split of {info.dataset} is empty")
        labels = torch.stack([data.label_tensor(i) for i in range(len(data))])
        return PairedSamples([Path(p) for p in data.paths], list(data.texts), list(range(len(data))), labels,
                             list(data.class_names), data.task)
    triplets = CIRRTriplets(root, split)
    if not triplets.records:
        raise DataError(f"{root}: the CIRR {split} split has no triplets")
    references = list(dict.fromkeys(r["reference"] for r in triplets.records))
    position = {name: i for i, name in enumerate(references)}
    return PairedSamples([triplets.paths_by_name[n] for n in references], [r["caption"] for r in triplets.records],
                         [position[r["reference"]] for r in triplets.records])


def image_transform(info: RunInfo, encoder: Any) -> Callable:
    """The image preprocessing the run used: the model's eval transform, or CIR's recorded transform."""
    if info.transform is None:
        return encoder.preprocess
    return make_transform(info.transform, image_size_of(encoder.model))
