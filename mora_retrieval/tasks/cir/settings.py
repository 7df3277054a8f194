"""Settings of a CIR run: the recipe's defaults per adapter method, and the layers over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...adapters import AdapterConfig, get_method
from ...engine import TrainConfig
from ...errors import TrainingError
from ...runs import FinishedRun, has_record, read_record
from ..settings import SettingsRecord, layered, method_of, read_config_file


@dataclass
class CIRSettings(SettingsRecord):
    """Everything ``train_cirr`` needs; ``stage2=None`` skips the Combiner."""

    TASK = "cir"
    NESTED = {"adapter": AdapterConfig, "stage1": TrainConfig, "stage2": TrainConfig}

    data_root: str
    run_dir: str
    arch: str = "ViT-B-16"
    pretrained: str | None = "openai"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig | None = None
    transform: str = "targetpad"
    skip_bad_images: bool = False
    eval_batch_size: int = 256
    cache_frozen: bool = False  # cache the frozen blocks' outputs across epochs (deterministic inputs)
    prepared: bool = True  # read the galleries from the prepared-image cache (decoded once), not the files
    prepared_dir: str | None = None  # where the cache lives; None: data.prepared.default_prepared_dir(data_root)

    @classmethod
    def with_defaults(cls, data_root: str, run_dir: str, method: str = "mora", **overrides: Any) -> "CIRSettings":
        """The recipe's defaults for ``method`` (docs/protocols.md §1, §4: the CIRR row for the adapters,
        CLIP4CIR's for ``full`` and the Combiner, which is Adam, i.e. AdamW without weight decay),
        then ``overrides``."""
        adapter = AdapterConfig(method=method, r=4, r_shared=4, alpha=get_method(method).default_alpha,
                                targets=("q", "v"), layers=2)
        if method == "full":
            stage1 = TrainConfig(epochs=20, batch_size=128, lr=2e-6, weight_decay=0.01)
        else:
            stage1 = TrainConfig(epochs=20, batch_size=256, lr=1e-2, weight_decay=0.02)
        stage2 = TrainConfig(epochs=20, batch_size=512, lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999))
        return cls(data_root=data_root, run_dir=run_dir, adapter=adapter, stage1=stage1, stage2=stage2, **overrides)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data_root = str(self.data_root)


def build_settings(data_root: str, run_dir: str, method: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, resume: bool = False) -> CIRSettings:
    """The settings layers (:mod:`..settings`) over the method's defaults, or, with ``resume`` and an
    existing run, over the run's own config. ``{"no_combiner": True}`` (either layer) drops stage 2."""
    config = read_config_file(config_file)
    overrides = dict(overrides or {})
    if method is not None:
        overrides["adapter"] = {**overrides.get("adapter", {}), "method": method}
    no_combiner = [layer.pop("no_combiner", None) for layer in (config, overrides)]
    defaults = CIRSettings.with_defaults(data_root, run_dir, method_of(config, overrides)).to_dict()
    base = defaults
    if resume and has_record(run_dir):  # an older run: its record, plus the top-level keys the recipe has gained since
        saved = FinishedRun(Path(run_dir), read_record(run_dir, TrainingError), TrainingError)
        CIRSettings.from_run(saved, run_dir=run_dir)  # the record alone must make settings (one line naming it)
        base = {**defaults, **saved.record}
    merged = layered(base, config, overrides, str(config_file))
    merged["data_root"] = str(data_root)  # paths may change on resume (a moved dataset)
    if any(no_combiner):
        merged["stage2"] = None
    return CIRSettings.from_dict(merged, run_dir)
