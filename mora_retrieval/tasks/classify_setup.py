"""Settings of a classification run: per-dataset defaults, data under a scenario, model, head files.

Defaults (METHOD.md §1, the paper's released configuration):

============== ======== ====== ======= ====== ===== ===== ===== ======
dataset        r, r_s   α      targets layers lr    wd    batch epochs
============== ======== ====== ======= ====== ===== ===== ===== ======
food101        4, 4     0.01   q, v    2      1e-2  0.02  256   20
mmimdb         4, 4     0.001  q, k    2      1e-2  0.02  256   20
hateful_memes  8, 8     0.1    k, v    2      1e-2  0.1   16    5
============== ======== ====== ======= ====== ===== ===== ===== ======

α is MoRA's strength and applies to MoRA and its ablations; LoRA/DoRA keep their own default
(α = r, i.e. scale 1) unless ``alpha`` is given. The backbone defaults to ViT-B-16 with the
``openai`` weights, as in the paper.

Scenarios: ``missing`` (training), ``val_missing`` (model selection; default = the training
scenario, so the test scenario never influences which epoch is kept) and ``test_missing``
(default = the training scenario). Assignments are drawn once and stored per (dataset, split,
scenario, seed) in ``missing_store``: default ``<data-root>/missing_assignments``, or, when the
data root is not writable, ``~/.cache/mora-retrieval/missing_assignments/<dataset>-<hash of the
root>``. ``missing_seed`` (default 0) is independent of the training seed, so runs with
different training seeds see the same samples missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import TrainingError

HEAD_FILE = "head.safetensors"
MERGED_FILE = "merged.safetensors"
ADAPTER_DIR = "adapter"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
HEAD_FORMAT = "mora-retrieval-classifier-head"


@dataclass(frozen=True)
class DatasetDefaults:
    """One row of the defaults table."""

    r: int
    r_shared: int
    alpha: float
    targets: tuple[str, ...]
    layers: int
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int


DATASET_DEFAULTS = {
    "food101": DatasetDefaults(4, 4, 0.01, ("q", "v"), 2, 1e-2, 0.02, 256, 20),
    "mmimdb": DatasetDefaults(4, 4, 0.001, ("q", "k"), 2, 1e-2, 0.02, 256, 20),
    "hateful_memes": DatasetDefaults(8, 8, 0.1, ("k", "v"), 2, 1e-2, 0.1, 16, 5),
}


def canonical_dataset(name: str) -> str:
    """``hateful-memes`` → ``hateful_memes``; unknown names are a DataError."""
    from ..data.registry import canonical_name

    return canonical_name(name)


def default_adapter_config(dataset: str, method: str = "mora", **overrides: Any):
    """The dataset's adapter defaults for ``method``; ``None`` overrides are ignored."""
    from ..adapters import AdapterConfig, get_method

    d = DATASET_DEFAULTS[canonical_dataset(dataset)]
    values: dict[str, Any] = {"method": method, "r": d.r, "r_shared": d.r_shared, "targets": d.targets, "layers": d.layers,
                              "alpha": None if get_method(method).default_alpha is None else d.alpha}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AdapterConfig(**values)


def default_train_config(dataset: str, **overrides: Any):
    """The dataset's optimiser defaults as a :class:`TrainConfig`; ``None`` overrides are ignored
    (except for the fields whose ``None`` means "off", which pass through only when given)."""
    from ..engine import TrainConfig

    d = DATASET_DEFAULTS[canonical_dataset(dataset)]
    values: dict[str, Any] = {"epochs": d.epochs, "batch_size": d.batch_size, "lr": d.lr,
                              "weight_decay": d.weight_decay}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def default_missing_store(data_root: str | os.PathLike, dataset: str) -> Path:
    """``<data_root>/missing_assignments`` if writable, else a per-root folder in the user cache."""
    root = Path(data_root).resolve()
    store = root / "missing_assignments"
    try:
        store.mkdir(parents=True, exist_ok=True)
        if os.access(store, os.W_OK):
            return store
    except OSError:
        pass
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "mora-retrieval" / "missing_assignments" / f"{dataset}-{digest}"


@dataclass
class ClassifySettings:
    """Everything that defines a classification run besides the optimiser (``TrainConfig``)."""

    dataset: str
    data_root: str
    arch: str = "ViT-B-16"
    pretrained: str | None = "openai"
    adapter: dict[str, Any] = field(default_factory=dict)  # AdapterConfig.to_dict()
    missing: str = "both:0.7"
    val_missing: str | None = None
    test_missing: str | None = None
    missing_image: str = "ones"
    missing_seed: int = 0
    missing_store: str | None = None
    features: str = "normalized"
    eval_batch_size: int = 256
    skip_bad_images: bool = False

    def __post_init__(self) -> None:
        from ..data.missing import MISSING_IMAGE_FILLS, MissingSpec
        from .classify import FEATURE_MODES

        self.dataset = canonical_dataset(self.dataset)
        self.data_root = str(Path(self.data_root).resolve())
        if self.pretrained not in (None, "", "none") and Path(self.pretrained).exists():
            self.pretrained = str(Path(self.pretrained).resolve())
        if self.pretrained in ("", "none"):
            self.pretrained = None
        if not self.adapter:
            self.adapter = default_adapter_config(self.dataset).to_dict()
        for spec in (self.missing, self.val_missing, self.test_missing):
            if spec is not None:
                MissingSpec.parse(spec)  # validates
        if self.missing_image not in MISSING_IMAGE_FILLS:
            raise TrainingError(f"--missing-image must be ones or white, got {self.missing_image!r}")
        if self.features not in FEATURE_MODES:
            raise TrainingError(f"features must be normalized or raw, got {self.features!r}")
        if self.missing_store is None:
            self.missing_store = str(default_missing_store(self.data_root, self.dataset))

    @property
    def scenarios(self) -> dict[str, str]:
        """The scenario of each split, as canonical strings (``str(MissingSpec)``)."""
        from ..data.missing import MissingSpec

        train = str(MissingSpec.parse(self.missing))
        val = str(MissingSpec.parse(self.val_missing)) if self.val_missing else train
        test = str(MissingSpec.parse(self.test_missing)) if self.test_missing else train
        return {"train": train, "val": val, "test": test}

    def adapter_config(self):
        from ..adapters import AdapterConfig

        return AdapterConfig.from_dict(self.adapter)

    def training_record(self) -> dict[str, Any]:
        """What the engine stores as ``extra`` and checks on resume: the settings that change training."""
        scen = self.scenarios
        return {"task": "classify", "dataset": self.dataset, "data_root": self.data_root, "arch": self.arch,
                "pretrained": self.pretrained, "adapter": self.adapter,
                "scenarios": {"train": scen["train"], "val": scen["val"]},
                "missing_image": self.missing_image, "missing_seed": self.missing_seed,
                "missing_store": self.missing_store, "features": self.features,
                "skip_bad_images": self.skip_bad_images}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifySettings":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_scenarios(self, **kw: str | None) -> "ClassifySettings":
        return replace(self, **kw)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The classification record of a run folder (``config.json``), or a one-line error."""
    from ..fileio import read_json

    path = Path(run_dir) / CONFIG_FILE
    data = read_json(path, "run config", error=TrainingError)
    record = data.get("classify") if isinstance(data, dict) else None
    if not isinstance(record, dict):
        extra = data.get("extra") if isinstance(data, dict) else None
        if isinstance(extra, dict) and extra.get("task") == "classify":
            raise TrainingError(f"{path}: the run did not finish (no classify record); resume it with --resume")
        raise TrainingError(f"{path}: not a classification run (expected task 'classify')")
    return record


def scenario_data(settings: ClassifySettings, split: str, scenario: str, transform: Any):
    """The split's dataset with the scenario's stored missing-modality codes applied."""
    from ..data.missing import MissingAssignments, MissingSpec, WithMissingModality
    from ..data.registry import get_classification_dataset

    dataset = get_classification_dataset(settings.dataset, settings.data_root, split, transform=transform,
                                         skip_bad_images=settings.skip_bad_images)
    spec = MissingSpec.parse(scenario, seed=settings.missing_seed)
    codes = MissingAssignments(settings.missing_store).get(dataset.name, split, len(dataset), spec)
    return WithMissingModality(dataset, codes, missing_image=settings.missing_image)


def embed_dim_of(model: Any, tokenizer: Any) -> int:
    """The joint embedding width (one text forward on the empty string)."""
    import torch

    with torch.no_grad():
        return int(model.encode_text(tokenizer([""]).to(next(model.parameters()).device)).shape[-1])


def save_head(head: Any, path: str | os.PathLike, task: str, class_names: list[str], features: str) -> Path:
    """Write the linear head as safetensors (``weight``, ``bias``) with its metadata."""
    from ..fileio import save_tensors

    path = Path(path)
    save_tensors(path, {"weight": head.linear.weight.detach().cpu().contiguous(),
                        "bias": head.linear.bias.detach().cpu().contiguous()},
                 metadata={"format": HEAD_FORMAT, "task": task, "features": features,
                           "class_names": json.dumps(list(class_names))})
    return path


def load_head(path: str | os.PathLike):
    """``(LinearHead, {"task", "features", "class_names"})`` from :func:`save_head`'s file."""
    from safetensors import safe_open

    from ..fileio import load_tensors
    from .classify import LinearHead

    path = Path(path)
    tensors = load_tensors(path, "classifier head", error=TrainingError)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - load_tensors already read it; treat a failure as foreign
        meta = {}
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if meta.get("format") != HEAD_FORMAT or weight is None or bias is None or weight.ndim != 2 \
            or tuple(bias.shape) != (weight.shape[0],):
        raise TrainingError(f"{path}: not a classifier head (expected {HEAD_FORMAT} with weight [C, D] and bias [C])")
    head = LinearHead(weight.shape[1], weight.shape[0])
    head.linear.weight.data.copy_(weight)
    head.linear.bias.data.copy_(bias)
    return head, {"task": meta.get("task"), "features": meta.get("features", "normalized"),
                  "class_names": json.loads(meta.get("class_names", "[]"))}
