"""Finished runs as the analysis sees them: settings, the two models, the samples and the image transform.

The only module of :mod:`mora_retrieval.analysis` that imports ``mora_retrieval.tasks`` (the
settings of classification and CIR runs). The samples: a classification run's split (image and
text; the categories are the classes); a CIR run's CIRR split (each triplet's reference image and
caption; no categories).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..adapters import AdapterConfig, get_method
from ..adapters.io import CONFIG_FILE as ADAPTER_CONFIG_FILE
from ..data.cirr import CIRR_SPLITS, CIRRTriplets
from ..data.images import make_transform, preprocess_spec
from ..data.registry import get_classification_dataset
from ..errors import DataError, TrainingError
from ..model.backbone import Backbone
from ..runs import ADAPTER_DIR, MERGED_FILE, FinishedRun
from ..tasks.cir.settings import CIRSettings
from ..tasks.classify.settings import ClassifySettings, read_run_config
from .samples import PairedSamples

CLASSIFY, CIR = "classify", "cir"
SPLITS = {CLASSIFY: ("train", "val", "test"), CIR: CIRR_SPLITS}
DEFAULT_SPLIT = {CLASSIFY: "test", CIR: "val"}


@dataclass(frozen=True)
class AnalysisRun:
    """A finished classification or CIR run with the settings the analysis reads beyond ``FinishedRun``'s."""

    run: FinishedRun
    adapter: AdapterConfig
    dataset: str
    data_root: str
    transform: str | None  # CIR's image transform; None: the model's own eval preprocessing
    skip_bad_images: bool

    @property
    def adapter_dir(self) -> Path:
        return self.run.path / ADAPTER_DIR


def read_run(run_dir: str | Path) -> AnalysisRun:
    """Read a finished ``mora-ret classify`` or ``mora-ret train cirr`` run folder (one-line errors)."""
    run = FinishedRun.open(run_dir, TrainingError, tasks=(CLASSIFY, CIR),
                           needs="analyze needs a run folder of `mora-ret classify` or `mora-ret train cirr`")
    if run.task == CLASSIFY:
        settings = ClassifySettings.from_run(run, read_run_config(run))
        dataset, transform = settings.dataset, None
    else:
        settings = CIRSettings.from_run(run, run_dir=str(run.path))
        dataset, transform = "cirr", settings.transform
    info = AnalysisRun(run, settings.adapter, dataset, settings.data_root, transform, settings.skip_bad_images)
    if get_method(info.adapter.method).mergeable:  # a prompt method's run (dcp, mmp) keeps only its adapter
        run.require(MERGED_FILE)
    run.require(f"{ADAPTER_DIR}/{ADAPTER_CONFIG_FILE}")
    return info


def run_samples(info: AnalysisRun, split: str, data_root: str | None = None) -> PairedSamples:
    """The image–text samples of ``split`` (see the module docstring)."""
    task = info.run.task
    if split not in SPLITS[task]:
        raise DataError(f"--split {split!r}: a {task} run has the splits {', '.join(SPLITS[task])}")
    root = data_root or info.data_root
    if task == CLASSIFY:
        data = get_classification_dataset(info.dataset, root, split, transform=None,
                                          skip_bad_images=info.skip_bad_images)
        if len(data) == 0:
            raise DataError(f"{root}: the {split} split of {info.dataset} is empty")
        labels = torch.stack([data.label_tensor(i) for i in range(len(data))])
        return PairedSamples([Path(p) for p in data.paths], list(data.texts), list(range(len(data))), labels,
                             list(data.class_names))
    triplets = CIRRTriplets(root, split)
    if not triplets.records:
        raise DataError(f"{root}: the CIRR {split} split has no triplets")
    references = list(dict.fromkeys(r["reference"] for r in triplets.records))
    position = {name: i for i, name in enumerate(references)}
    return PairedSamples([triplets.paths_by_name[n] for n in references], [r["caption"] for r in triplets.records],
                         [position[r["reference"]] for r in triplets.records])


def image_transform(info: AnalysisRun, backbone: Backbone) -> Callable:
    """The image preprocessing the run used: the model's eval transform, or CIR's recorded transform on the
    model's own preprocessing (as ``train cirr`` and ``eval cirr`` build it)."""
    if info.transform is None:
        return backbone.preprocess
    return make_transform(preprocess_spec(backbone.model, info.transform))
