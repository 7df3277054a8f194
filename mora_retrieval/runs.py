"""The run folder every training command writes: its file names, the run record, resume, a finished run.

Layout (the engine's own files, one set per engine run, are named in
:mod:`~mora_retrieval.engine.checkpoint`)::

    config.json             the run record: the resolved settings (a ``task`` key names the recipe)
    metrics.jsonl, curves.png, checkpoints/last.pt, checkpoints/best.safetensors
                            the engine's files: in the run folder (classification), in stage1/ and
                            stage2/ (CIR) or in train/ (pretraining)
    adapter/                the adapter of the best epoch (docs/protocols.md §7)
    merged.safetensors      the adapter folded into the backbone: a plain open_clip checkpoint (none
                            for the prompt methods dcp and mmp, which cannot be merged)
    combiner.safetensors    CIR: the Combiner
    head.safetensors        classification: the linear head
    pretrained.safetensors  pretraining: the best epoch's weights
    results.json            the recipe's results (non-finite numbers written as null)
    eval/                   classification: one ``<split>-<scenario>.json`` per later re-test
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import load_merged, read_adapter_config
from .engine.checkpoint import CONFIG_FILE, LAST_FILE
from .errors import BackboneError, MoraError
from .fileio import read_json, write_json
from .model.backbone import Backbone, load_backbone, weights_fingerprint

ADAPTER_DIR = "adapter"
MERGED_FILE = "merged.safetensors"
COMBINER_FILE = "combiner.safetensors"
HEAD_FILE = "head.safetensors"
PRETRAINED_FILE = "pretrained.safetensors"
RESULTS_FILE = "results.json"
EVAL_DIR = "eval"
#: Sub-folders holding an engine run: CIR's two stages and pretraining's one.
STAGE1_DIR, STAGE2_DIR, PRETRAIN_DIR = "stage1", "stage2", "train"
#: How errors name the runs of each recipe (the ``task`` of the record).
TASK_NAMES = {"classify": "classification", "cir": "CIR", "pretrain": "pretraining"}


def read_record(run_dir: str | os.PathLike, error: type[MoraError] = MoraError) -> dict[str, Any]:
    """The run's ``config.json`` as a dict; a missing or malformed file raises ``error`` (one line)."""
    path = Path(run_dir) / CONFIG_FILE
    record = read_json(path, "run config", error=error)
    if not isinstance(record, dict):
        raise error(f"{path}: expected a JSON object of run settings")
    return record


def write_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``config.json`` (atomically)."""
    write_json(Path(run_dir) / CONFIG_FILE, record)


def update_record(run_dir: str | os.PathLike, **keys: Any) -> None:
    """Add top-level keys to an existing ``config.json`` (e.g. the engine's, once a recipe is done)."""
    write_record(run_dir, {**read_record(run_dir), **keys})


def has_record(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / CONFIG_FILE).is_file()


def resumable(engine_dir: str | os.PathLike, resume: bool) -> bool:
    """Whether to resume the engine run in ``engine_dir``: asked for, and a checkpoint to resume (without
    one, e.g. a run stopped before its first or a stage that never started, training starts afresh)."""
    return resume and (Path(engine_dir) / LAST_FILE).is_file()


def finite(obj: Any) -> Any:
    """JSON has no NaN: non-finite floats become None, in nested dicts and lists too."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write a results file (``results.json``, ``eval/…json``); NaN and inf become null."""
    write_json(path, finite(results))


@dataclass
class FinishedRun:
    """A run folder as its products: the record and whichever of the weight files exist."""

    path: Path
    record: dict[str, Any]
    error: type[MoraError] = MoraError  # raised, with one line, for what the run lacks

    @classmethod
    def open(cls, run_dir: str | os.PathLike, error: type[MoraError] = MoraError, tasks: tuple[str, ...] = (),
             needs: str = "") -> "FinishedRun":
        """Read ``config.json``; it must name the architecture (``arch``) and, given ``tasks``, one of them
        (``needs`` ends the error for another task, e.g. which commands write such runs)."""
        path = Path(run_dir)
        if not path.is_dir():
            raise error(f"{path}: run folder not found (expected a folder with {CONFIG_FILE})")
        run = cls(path, read_record(path, error), error)
        if tasks and run.task not in tasks:
            names, ending = " or ".join(TASK_NAMES.get(task, task) for task in tasks), f"; {needs}" if needs else ""
            raise error(f"{path / CONFIG_FILE}: not a {names} run (task {run.task!r}){ending}")
        if "arch" not in run.record:
            if tasks:  # the engine's record only (classification writes the run's own when it ends)
                raise error(f"{path / CONFIG_FILE}: the run did not finish (no {run.task} record); "
                            "resume it with --resume")
            raise error(f"{path / CONFIG_FILE}: expected a JSON object with an 'arch' key")
        return run

    @property
    def task(self) -> str | None:
        """The recipe that wrote the run (``classify``, ``cir``, ``pretrain``); an unfinished classification run
        names it only in the engine's record (``extra``)."""
        extra = self.record.get("extra")
        return self.record.get("task") or (extra.get("task") if isinstance(extra, dict) else None)

    @property
    def arch(self) -> str:
        return self.record["arch"]

    @property
    def pretrained(self) -> str | None:
        """The base weights' tag or file; None for random weights (recorded as None, "" or "none")."""
        pretrained = self.record.get("pretrained")
        return None if pretrained in ("", "none") else pretrained

    def find(self, name: str) -> Path | None:
        """``path / name`` if it exists, else None."""
        found = self.path / name
        return found if found.exists() else None

    def require(self, name: str) -> Path:
        """``path / name``, or a one-line error saying the run did not finish."""
        found = self.find(name)
        if found is None:
            raise self.error(f"{self.path / name}: not found (the run did not finish; resume it with --resume)")
        return found

    @property
    def seed(self) -> int | None:
        """The training seed (classification: ``train.seed``; CIR: ``stage1.seed``), if recorded."""
        for section in ("train", "stage1"):
            part = self.record.get(section)
            if isinstance(part, dict) and part.get("seed") is not None:
                return int(part["seed"])
        return None

    def load_base(self, device: str = "cpu") -> Backbone:
        """The backbone the run started from, in eval mode: its ``pretrained`` weights, or random weights re-drawn
        from the run's training seed as training drew them (the global random state is left as it was). Checked
        against the base-weight fingerprint ``adapter/`` recorded: a run is never merged onto other weights."""
        with torch.random.fork_rng(), warnings.catch_warnings():
            if self.pretrained is None and self.seed is not None:
                warnings.filterwarnings("ignore", message=".*randomly initialised.*")  # the run's own draw
                torch.manual_seed(self.seed)
            backbone = load_backbone(self.arch, self.pretrained, device=device)
        adapter = self.find(ADAPTER_DIR)
        expected = read_adapter_config(adapter).get("base_fingerprint") if adapter is not None else None
        if expected and (found := weights_fingerprint(backbone.model)) != expected:
            weights = self.pretrained or f"random weights from seed {self.seed}"
            raise BackboneError(f"{adapter}: the run started from base weights {expected}, but {self.arch} with "
                                f"{weights} gives {found} (the pretrained file changed?)")
        backbone.model.eval()
        return backbone

    def load_model(self, device: str = "cpu") -> Backbone:
        """The run's final weights, in eval mode: ``merged.safetensors``, or, where only ``adapter/`` was kept,
        the adapter merged onto the run's base weights (:meth:`load_base`; a prompt method's adapter, which
        cannot be merged, stays unmerged). An unfinished run is refused, never replaced by its base weights."""
        merged, adapter = self.find(MERGED_FILE), self.find(ADAPTER_DIR)
        if merged is None and adapter is None:
            raise self.error(f"{self.path}: the run has not finished (neither {MERGED_FILE} nor {ADAPTER_DIR}/ is "
                             f"there yet): let it finish, or resume it with --resume, before using its weights")
        if merged is not None:
            backbone = load_backbone(self.arch, str(merged), device=device)
        else:
            backbone = self.load_base(device)
            # load_base checked the fingerprint
            backbone.model = load_merged(backbone.model, adapter, self.arch, check_fingerprint=False)
        backbone.model.eval()
        return backbone
