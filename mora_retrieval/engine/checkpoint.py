"""The engine's run folder: config, resumable checkpoint, best weights, and the resume check.

Layout of ``<run>/`` (the names are defined here; :mod:`mora_retrieval.runs` adds the recipes'):

- ``config.json``: ``{"train": TrainConfig, "resolved": {device, precision, world_size, train_samples,
  effective_batch_size, steps...}, "extra": <the caller's extra_config>}``;
- ``metrics.jsonl``: one JSON object per finished epoch (rewritten whole, atomically);
- ``checkpoints/last.pt``: resumable state (``torch.save``; read back with ``weights_only=True``):
  trainable state, optimiser, scheduler, position (epoch, micro-batch within the epoch, global
  optimiser step), per-rank RNG states, best metric/epoch, early-stopping counter, history;
- ``checkpoints/best.safetensors``: trainable state of the best epoch (metadata: epoch, metric);
- ``curves.png``: train loss and validation metrics per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import MoraError, TrainingError
from ..fileio import atomic_write, read_json, save_tensors
from .config import TRAINING_FIELDS, TrainConfig

CHECKPOINT_FORMAT = "mora-engine-checkpoint/1"
CONFIG_FILE = "config.json"
LAST_FILE = "checkpoints/last.pt"
BEST_FILE = "checkpoints/best.safetensors"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (a crash never leaves half a file)."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint the engine wrote (``weights_only=True``: nothing is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise TrainingError(f"{path}: not a readable engine checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an engine checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def save_best(path: Path, trainable: dict[str, torch.Tensor], epoch: int, metric: str, value: float) -> None:
    """Write the best epoch's trainable state as safetensors (tensors cloned: no shared storage)."""
    tensors = {key: tensor.detach().cpu().clone() for key, tensor in trainable.items()}
    save_tensors(path, tensors, metadata={"epoch": str(epoch), "metric": metric, "value": repr(value)})


def resume_or_fail(run_dir: Path, config: TrainConfig, extra_config: dict | None = None,
                   world_size: int = 1, train_samples: int | None = None) -> Path:
    """Path of ``last.pt`` if ``run_dir`` can be resumed with this setup, else a one-line error.

    A resume must keep :data:`~mora_retrieval.engine.config.TRAINING_FIELDS`, the number of
    processes, the size of the training set (the data order and the schedule follow it) and the
    caller's ``extra_config`` (put only settings that define the model and data there); device,
    workers, logging, checkpoint cadence and patience may change.
    """
    where = Path(run_dir) / CONFIG_FILE
    try:
        saved = read_json(where, "run config")
    except MoraError as exc:
        raise TrainingError(f"cannot resume: {exc}") from None
    try:
        old = TrainConfig.from_dict(saved["train"]).to_dict()
    except (KeyError, TypeError) as exc:
        raise TrainingError(f"{where}: malformed run config ({exc})") from None
    new = config.to_dict()
    for key in TRAINING_FIELDS:
        if old[key] != new[key]:
            raise TrainingError(f"{where}: cannot resume: {key} was {old[key]!r}, now {new[key]!r} "
                                f"(this changes training; use a new run folder)")
    old_world = saved.get("resolved", {}).get("world_size", 1)
    if old_world != world_size:
        raise TrainingError(f"{where}: cannot resume: the run used {old_world} process(es), now {world_size}")
    old_samples = saved.get("resolved", {}).get("train_samples")  # absent in runs of older versions
    if None not in (old_samples, train_samples) and old_samples != train_samples:
        raise TrainingError(f"{where}: cannot resume: the training set had {old_samples} samples, now "
                            f"{train_samples} (the data changed; use a new run folder)")
    old_extra = saved.get("extra") or {}
    new_extra = json.loads(json.dumps(extra_config or {}))  # tuples → lists, as on disk
    if old_extra != new_extra:
        changed = sorted(k for k in set(old_extra) | set(new_extra) if old_extra.get(k) != new_extra.get(k))
        raise TrainingError(f"{where}: cannot resume: task settings changed ({', '.join(changed)}); "
                            f"use a new run folder")
    path = Path(run_dir) / LAST_FILE
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found (nothing to resume)")
    return path
