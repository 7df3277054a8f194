"""Settings of a classification run: per-dataset defaults, the settings layers, data under a scenario.

Defaults: :data:`DATASET_DEFAULTS` (docs/protocols.md §1, the paper's released configuration). α is
MoRA's strength and applies to MoRA and its ablations; LoRA/DoRA keep their own default (α = r, i.e.
scale 1) unless ``alpha`` is given. The backbone defaults to ViT-B-16 with the ``openai`` weights.

Scenarios: ``missing`` (training), ``val_missing`` (model selection; default = the training
scenario, so the test scenario never influences which epoch is kept) and ``test_missing``
(default = the training scenario). Assignments are drawn once and stored per (dataset, split,
scenario, seed) in ``missing_store``: default ``<data-root>/missing_assignments``, or, when the
data root is not writable, ``~/.cache/mora-retrieval/missing_assignments/<dataset>-<hash of the
root>`` (decided when the data is first read: building settings writes nothing). ``missing_seed``
(default 0) is independent of the training seed, so runs with different training seeds see the
same samples missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ...adapters import AdapterConfig, get_method
from ...data.missing import MISSING_IMAGE_FILLS, MissingSpec, WithMissingModality, stored_missing_codes
from ...data.registry import canonical_name, get_classification_dataset
from ...engine import TrainConfig
from ...errors import TrainingError
from ...model.heads import FEATURE_MODES
from ...runs import CONFIG_FILE, FinishedRun
from ..settings import SettingsRecord, layered, method_of, read_config_file


#: Per dataset: the adapter's and the optimiser's defaults.
DATASET_DEFAULTS = {
    "food101": ({"r": 4, "r_shared": 4, "alpha": 0.01, "targets": ("q", "v"), "layers": 2},
                {"lr": 1e-2, "weight_decay": 0.02, "batch_size": 256, "epochs": 20}),
    "mmimdb": ({"r": 4, "r_shared": 4, "alpha": 0.001, "targets": ("q", "k"), "layers": 2},
               {"lr": 1e-2, "weight_decay": 0.02, "batch_size": 256, "epochs": 20}),
    "hateful_memes": ({"r": 8, "r_shared": 8, "alpha": 0.1, "targets": ("k", "v"), "layers": 2},
                      {"lr": 1e-2, "weight_decay": 0.1, "batch_size": 16, "epochs": 5}),
}


def default_adapter_config(dataset: str, method: str = "mora", **overrides: Any) -> AdapterConfig:
    """The dataset's adapter defaults for ``method`` (α only for the methods that have one), then ``overrides``."""
    adapter = DATASET_DEFAULTS[canonical_name(dataset)][0]
    alpha = None if get_method(method).default_alpha is None else adapter["alpha"]
    return AdapterConfig(**{**adapter, "method": method, "alpha": alpha, **overrides})


def default_train_config(dataset: str, **overrides: Any) -> TrainConfig:
    """The dataset's optimiser defaults as a :class:`TrainConfig`, then ``overrides``."""
    return TrainConfig(**{**DATASET_DEFAULTS[canonical_name(dataset)][1], **overrides})


@dataclass
class ClassifySettings(SettingsRecord):
    """Everything that defines a classification run besides the optimiser (``TrainConfig``);
    ``adapter=None`` takes the dataset's defaults, ``missing_store=None`` the default :meth:`store`."""

    NOT_RECORDED = ()
    NESTED = {"adapter": AdapterConfig}

    dataset: str
    data_root: str
    arch: str = "ViT-B-16"
    pretrained: str | None = "openai"
    adapter: AdapterConfig | None = None
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
        self.dataset = canonical_name(self.dataset)
        self.data_root = str(Path(self.data_root).resolve())
        if self.pretrained not in (None, "", "none") and Path(self.pretrained).exists():
            self.pretrained = str(Path(self.pretrained).resolve())
        if self.pretrained in ("", "none"):
            self.pretrained = None
        super().__post_init__()
        if self.adapter is None:
            self.adapter = default_adapter_config(self.dataset)
        for spec in (self.missing, self.val_missing, self.test_missing):
            if spec is not None:
                MissingSpec.parse(spec)  # validates
        if self.missing_image not in MISSING_IMAGE_FILLS:
            raise TrainingError(f"--missing-image must be ones or white, got {self.missing_image!r}")
        if self.features not in FEATURE_MODES:
            raise TrainingError(f"features must be normalized or raw, got {self.features!r}")

    @property
    def scenarios(self) -> dict[str, str]:
        """The scenario of each split, as canonical strings (``str(MissingSpec)``)."""
        train = str(MissingSpec.parse(self.missing))
        val = str(MissingSpec.parse(self.val_missing)) if self.val_missing else train
        test = str(MissingSpec.parse(self.test_missing)) if self.test_missing else train
        return {"train": train, "val": val, "test": test}

    def store(self) -> Path:
        """The folder of the missing-modality assignments (see the module docstring); the default one is created."""
        if self.missing_store is not None:
            return Path(self.missing_store)
        root = Path(self.data_root).resolve()
        store = root / "missing_assignments"
        with contextlib.suppress(OSError):
            store.mkdir(parents=True, exist_ok=True)
            if os.access(store, os.W_OK):
                return store
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "mora-retrieval" / "missing_assignments" / f"{self.dataset}-{digest}"

    def training_record(self) -> dict[str, Any]:
        """What the engine stores as ``extra`` and checks on resume: the settings that change training."""
        scen = self.scenarios
        return {"task": "classify", "dataset": self.dataset, "data_root": self.data_root, "arch": self.arch,
                "pretrained": self.pretrained, "adapter": self.adapter.to_dict(),
                "scenarios": {"train": scen["train"], "val": scen["val"]},
                "missing_image": self.missing_image, "missing_seed": self.missing_seed,
                "missing_store": str(self.store()), "features": self.features,
                "skip_bad_images": self.skip_bad_images}


def build_settings(dataset: str | None, data_root: str | None, config_file: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None) -> tuple[ClassifySettings, TrainConfig]:
    """The settings layers (:mod:`..settings`) over the dataset's defaults: the keys of :meth:`ClassifySettings.to_dict`
    and ``train``. The dataset and the data root come from the arguments, else from the config file."""
    config = read_config_file(config_file)
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise TrainingError("give the dataset (e.g. mora-ret classify food101 --data-root DIR)")
    fixed = {f.name: f.default for f in fields(ClassifySettings) if f.default is not MISSING}
    base = {**fixed, "dataset": canonical_name(dataset), "data_root": None,  # the defaults before any layer
            "adapter": default_adapter_config(dataset, method_of(config, overrides)).to_dict(),
            "train": default_train_config(dataset).to_dict()}
    merged = layered(base, config, {**(overrides or {}), "dataset": dataset, "data_root": data_root},
                     str(config_file))
    if merged["data_root"] is None:
        raise TrainingError(f"give --data-root for {merged['dataset']} (its root in the published layout)")
    return ClassifySettings.from_dict(merged), TrainConfig.from_dict(merged["train"])


def open_run(run_dir: str | os.PathLike) -> FinishedRun:
    """A classification run folder (one-line errors for anything else)."""
    return FinishedRun.open(run_dir, TrainingError, tasks=("classify",),
                            needs="expected a folder written by `mora-ret classify`")


def read_run_config(run: FinishedRun | str | os.PathLike) -> dict[str, Any]:
    """The classification record (in ``config.json``) of a run, open or given by its folder; one-line errors."""
    run = run if isinstance(run, FinishedRun) else open_run(run)
    record = run.record.get("classify")
    if not isinstance(record, dict):
        raise TrainingError(f"{run.path / CONFIG_FILE}: the run did not finish (no classify record); "
                            "resume it with --resume")
    missing = [key for key in ("dataset", "dataset_task", "class_names") if key not in record]
    if missing:
        raise TrainingError(f"{run.path / CONFIG_FILE}: not a valid classification run config (its classify "
                            f"record lacks {', '.join(missing)})")
    return record


def scenario_data(settings: ClassifySettings, split: str, scenario: str, transform: Any) -> WithMissingModality:
    """The split's dataset with the scenario's stored missing-modality codes applied."""
    dataset = get_classification_dataset(settings.dataset, settings.data_root, split, transform=transform,
                                         skip_bad_images=settings.skip_bad_images)
    spec = MissingSpec.parse(scenario, seed=settings.missing_seed)
    codes = stored_missing_codes(settings.store(), dataset.name, split, len(dataset), spec)
    return WithMissingModality(dataset, codes, missing_image=settings.missing_image)
