"""``Trainer``: the one training loop behind every task (CIR stage 1/2, classification).

An optimiser step takes ``grad_accum`` micro-batches (forward under autocast, ``loss / grad_accum``
backward, DDP gradient sync on the last one only), optional gradient clipping, AdamW and the
scheduler. An epoch is ``floor(batches per rank / grad_accum)`` steps: the partial last batch and an
unfinished accumulation group are skipped. After each epoch: validation, ``metrics.jsonl``, the best
checkpoint, early stopping, ``last.pt``; ``curves.png`` at most every ``PLOT_INTERVAL_S`` (drawing
costs ~0.5 s) and at the end. Layout: :mod:`.checkpoint`.

GPU syncs (tests/test_engine_training.py counts the engine's host reads on CPU): none between log
points. Batches come pinned on CUDA and move with ``non_blocking=True``, the loss adds up on the
device, and AdamW (``capturable=False``) keeps its step counters on the host. A log point (every
``log_every`` steps, before a checkpoint, at the end of an epoch) is one sync; there a NaN/inf loss
raises :class:`TrainingError` and ``last.pt`` is left as it was. Writing ``last.pt`` is one sync (the
NaN/inf check of the trainable tensors) plus ``torch.save``'s copies.

A ``None`` batch (:func:`~mora_retrieval.data.collate.collate_skip_none` skipped every item) keeps its
place in the epoch, so resume stays exact, adds no loss or gradient and is counted as ``empty_batches``
in ``metrics.jsonl``. With several processes it is an error: one rank cannot skip a batch alone.

Ctrl-C (SIGINT, or SIGTERM) stops at the next safe point: after an optimiser step (single process) or
at a log point (``torchrun``: the ranks agree through the loss all-reduce), where ``last.pt`` is written
and :class:`TrainingInterrupted` raised. A second Ctrl-C, or a ``KeyboardInterrupt`` from the task,
interrupts at once; a single process then rolls back to the last finished optimiser step and saves that.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..device import autocast, available_cores, resolve_device, resolve_num_workers, resolve_precision
from ..errors import TrainingError
from ..fileio import atomic_write, load_tensors, write_json
from ..progress import TrainProgress
from . import checkpoint as ckpt
from .config import TrainConfig, build_scheduler
from .curves import plot_curves
from .distributed import barrier, detect, process_group
from .module import TrainModule
from .rng import capture_rng, restore_rng, seed_everything
from .sampling import ResumableSampler, build_loader, to_device


#: Seconds between two drawings of curves.png after epochs.
PLOT_INTERVAL_S = 30.0


class TrainingInterrupted(TrainingError):
    """Training stopped on request after writing a resumable checkpoint."""


@contextlib.contextmanager
def stop_requests() -> Iterator[SimpleNamespace]:
    """Install SIGINT/SIGTERM handlers (main thread only) that set the yielded flag's ``requested``."""
    flag = SimpleNamespace(requested=False)

    def handle(signum: int, frame: FrameType | None) -> None:
        if flag.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.requested = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    """Outcome of :meth:`Trainer.fit` (epochs are 1-based, as in ``metrics.jsonl``)."""

    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    stopped_early: bool
    best_checkpoint: Path | None
    global_step: int = 0


@dataclass
class _Position:
    """Where training stands; what a resumable checkpoint records besides the weights."""

    epoch: int = 0  # 0-based index of the epoch in progress (= epochs completed)
    micro_batch: int = 0  # micro-batches of this epoch already consumed (per rank)
    global_step: int = 0  # optimiser steps taken
    loss_sum: float = 0.0  # summed micro-batch losses of this epoch (all ranks)
    loss_count: int = 0  # micro-batches in loss_sum (all ranks)
    empty_batches: int = 0  # micro-batches of this epoch whose every item was skipped
    best_metric: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train a :class:`TrainModule` on ``train_dataset`` into ``run_dir``. ``extra_config`` (JSON-ready) is
    stored in ``config.json`` and must match on resume; ``quiet`` silences the console (rank 0's only)."""

    def __init__(self, module: TrainModule, config: TrainConfig, run_dir: str | Path, train_dataset: Dataset,
                 collate_fn: Callable | None = None, console=None, *, extra_config: dict | None = None,
                 quiet: bool = False) -> None:
        if not isinstance(module, TrainModule):
            raise TypeError(f"Trainer needs a TrainModule, got {type(module).__name__}")
        if not hasattr(train_dataset, "__len__") or not hasattr(train_dataset, "__getitem__"):
            raise TrainingError(f"training set {type(train_dataset).__name__} must be a map-style dataset "
                                f"(__len__ and __getitem__)")
        self.module = module
        self.config = config
        self.run_dir = Path(run_dir)
        self.dataset = train_dataset
        self.collate_fn = collate_fn
        self.console = console
        self.quiet = quiet
        self.extra_config = extra_config or {}
        self.dist = detect()
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        self.num_workers = resolve_num_workers(config.num_workers, self.device, self.dist.world_size)
        module.precision, module.num_workers = self.precision, self.num_workers

    def fit(self, resume: bool = False) -> TrainResult:
        """Train (or continue an interrupted run with ``resume=True``) and return the outcome."""
        with process_group(self.config.device), stop_requests() as stop:
            return self._fit(resume, stop)

    def restore_best(self) -> bool:
        """After :meth:`fit`: load the best epoch's trainable state into the module. Without a best epoch
        (no finite validation metric) the last weights stay, with a warning, and the answer is False."""
        best = self.run_dir / ckpt.BEST_FILE
        if not best.is_file():
            if self.console is not None and not self.quiet and self.dist.is_main:
                self.console.print("[yellow]no epoch had a finite validation metric; keeping the last weights[/]")
            return False
        self.module.load_trainable_state_dict(load_tensors(best, "best checkpoint", error=TrainingError))
        return True

    def _fit(self, resume: bool, stop: SimpleNamespace) -> TrainResult:
        cfg, info = self.config, self.dist
        state = None
        if resume:
            state = ckpt.load_checkpoint(ckpt.resume_or_fail(self.run_dir, cfg, self.extra_config, info.world_size,
                                                             len(self.dataset)))
        elif (self.run_dir / ckpt.LAST_FILE).exists():
            raise TrainingError(f"{self.run_dir}: already holds a run (checkpoints/last.pt); "
                                f"resume it or choose a new run folder")

        self.module.to(self.device)
        sampler = ResumableSampler(len(self.dataset), cfg.batch_size, cfg.seed, info.rank, info.world_size)
        cfg.check_fits(len(self.dataset), "training set", info.world_size)
        self.steps_per_epoch = cfg.steps_per_epoch(len(self.dataset), info.world_size)
        self.total_steps = min(cfg.epochs * self.steps_per_epoch, cfg.max_steps or math.inf)
        samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size

        groups = self.module.optimizer_param_groups(cfg)
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise TrainingError(f"{type(self.module).__name__} has no trainable parameters")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_ratio)

        if state is not None:
            pos = self._restore(state)
        else:
            pos = _Position()
            seed_everything(cfg.seed + info.rank)
            if info.is_main:
                write_json(self.run_dir / ckpt.CONFIG_FILE, {
                    "train": cfg.to_dict(),
                    "resolved": {"device": str(self.device), "precision": self.precision,
                                 "world_size": info.world_size, "num_workers": self.num_workers,
                                 "train_samples": len(self.dataset), "effective_batch_size": samples_per_step,
                                 "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps},
                    "extra": self.extra_config,
                })

        self.model = self.module
        if info.enabled:
            self.model = DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # ranks and DataLoader workers share the cores: OpenMP threads spinning while other processes
            # hold them can slow a step by an order of magnitude (an explicit OMP_NUM_THREADS is kept)
            torch.set_num_threads(max(1, available_cores() // info.world_size - self.num_workers))
        loader = build_loader(self.dataset, sampler, self.collate_fn, self.num_workers, self.device)
        self.progress = TrainProgress(self.console, self.quiet, enabled=info.is_main)
        self._last_plot = time.monotonic()
        try:
            with self.progress:
                self.progress.start(self.total_steps, pos.global_step, samples_per_step, pos.epoch + 1)
                while not pos.finished:
                    self._run_epoch(pos, sampler, loader, stop)
        except TrainingInterrupted:
            self._plot(pos, force=True)
            raise
        self._plot(pos, force=True)
        barrier(info)
        best = self.run_dir / ckpt.BEST_FILE
        result = TrainResult(best_metric=pos.best_metric, best_epoch=pos.best_epoch, history=list(pos.history),
                             stopped_early=pos.stopped_early, best_checkpoint=best if best.is_file() else None,
                             global_step=pos.global_step)
        if info.is_main:
            self.progress.final_table(result, self.module.main_metric)
        return result

    def _restore(self, state: dict[str, Any]) -> _Position:
        self.module.load_trainable_state_dict(state["trainable"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise TrainingError(f"{self.run_dir / ckpt.LAST_FILE}: optimiser state does not fit this model "
                                f"({exc.__class__.__name__})") from None
        restore_rng(state["rng"][self.dist.rank])  # resume_or_fail checked the number of processes
        known = _Position.__dataclass_fields__
        return _Position(**{k: v for k, v in state["position"].items() if k in known})

    def _run_epoch(self, pos: _Position, sampler: ResumableSampler, loader, stop: SimpleNamespace) -> None:
        cfg, info = self.config, self.dist
        accum, max_steps = cfg.grad_accum, cfg.max_steps or math.inf
        limit = self.steps_per_epoch * accum
        start_micro = pos.micro_batch
        sampler.set_epoch(pos.epoch, start_batch=start_micro)
        loader.generator.manual_seed(sampler.epoch_seed)
        self.progress.update(epoch=pos.epoch + 1)
        self.module.train()
        window = torch.zeros((), device=self.device)  # losses of finished steps, not yet synced
        group = torch.zeros((), device=self.device)  # losses of the accumulation group in progress
        group_empty = 0  # None micro-batches of the group in progress
        window_count = window_steps = 0
        boundary_rng = capture_rng() if not info.enabled else None
        t_start = time.perf_counter()
        reached_max = pos.global_step >= max_steps
        remaining = 0 if reached_max else limit - start_micro
        stop_pending = False  # a stop the ranks agreed on at the epoch's last step
        updating = False
        try:
            for batch in itertools.islice(loader, remaining):
                last = (pos.micro_batch + 1) % accum == 0
                if batch is None:
                    if info.enabled:
                        raise TrainingError(f"rank {info.rank}: every item of a training batch was skipped as a bad "
                                            f"image; several processes cannot skip one rank's batch (remove the "
                                            f"bad images or use a larger batch size)")
                    group_empty += 1
                else:
                    sync = self.model.no_sync() if info.enabled and not last else contextlib.nullcontext()
                    with sync:
                        with autocast(self.device, self.precision):
                            loss = self.model(to_device(batch, self.device))
                        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                            raise TrainingError(
                                f"{type(self.module).__name__}.forward must return a scalar loss tensor")
                        loss = loss.float()  # no-op for an fp32 loss
                        (loss / accum if accum > 1 else loss).backward()
                    group += loss.detach()
                pos.micro_batch += 1
                if not last:
                    continue
                updating = True  # an interrupt from here to the next boundary cannot be rolled back
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                pos.global_step += 1
                window += group
                group.zero_()
                window_count += accum - group_empty
                window_steps += 1
                pos.empty_batches += group_empty
                group_empty = 0
                self.progress.advance()
                reached_max = pos.global_step >= max_steps
                end = reached_max or pos.micro_batch >= limit
                ckpt_due = cfg.checkpoint_every is not None and pos.global_step % cfg.checkpoint_every == 0
                log_due = pos.global_step % cfg.log_every == 0 or end or ckpt_due
                stop_now = stop.requested and not info.enabled
                if log_due or stop_now:
                    stop_now = self._sync_window(pos, window, window_count, window_steps, stop.requested) or stop_now
                    window.zero_()
                    window_count = window_steps = 0
                if stop_now and end:
                    stop_pending = True  # finish the epoch (validation, last.pt), then stop
                elif stop_now:
                    self._save_last(pos)
                    raise self._interrupted(pos)
                elif ckpt_due and not end:
                    self._save_last(pos)
                if not info.enabled:
                    boundary_rng = capture_rng()
                updating = False
                if reached_max:
                    break
            train_time = time.perf_counter() - t_start
            t_eval = time.perf_counter()
            metrics = self._evaluate()
        except KeyboardInterrupt:
            if updating or boundary_rng is None:
                raise  # mid-update (parameters and optimiser may disagree), or ranks that cannot agree here
            # single process: roll back to the last finished optimiser step and save it
            self.optimizer.zero_grad(set_to_none=True)
            pos.micro_batch -= pos.micro_batch % accum
            self._sync_window(pos, window, window_count, window_steps, False)
            self._save_last(pos, rng=boundary_rng)
            raise self._interrupted(pos) from None
        self._end_epoch(pos, metrics, start_micro, train_time, time.perf_counter() - t_eval, reached_max)
        if (stop_pending or (stop.requested and not info.enabled)) and not pos.finished:
            raise self._interrupted(pos)

    def _sync_window(self, pos: _Position, window: torch.Tensor, count: int, steps: int, stop: bool) -> bool:
        """Read the loss of the window's ``count`` micro-batches (all ranks) and ``steps`` optimiser steps,
        fold it into the epoch, NaN-check; True if any rank stops. One host sync (count and stop
        are filled in on the device, not copied from the host)."""
        vec = torch.stack([window, window.new_full((), count), window.new_full((), float(stop))])
        if self.dist.enabled:
            dist.all_reduce(vec)
        total, n, stops = vec.tolist()
        if not math.isfinite(total):
            last = self.run_dir / ckpt.LAST_FILE
            kept = (f"{last} (the last good state) was left untouched" if last.exists()
                    else "no checkpoint had been written yet")
            raise TrainingError(
                f"non-finite training loss ({total}) in epoch {pos.epoch + 1}, optimiser steps "
                f"{pos.global_step - steps + 1}-{pos.global_step}; {kept} (try a lower lr, max_grad_norm or fp32)")
        pos.loss_sum += total
        pos.loss_count += int(n)
        if n:
            self.progress.update(loss=total / n)
        return stops > 0

    def _evaluate(self) -> dict[str, float]:
        """Rank 0 validates the unwrapped module; the metrics are broadcast to every rank."""
        metrics = None
        if self.dist.is_main:
            self.module.eval()
            with torch.no_grad():
                raw = self.module.evaluate(self.device)
            self.module.train()
            metric = self.module.main_metric
            if not isinstance(raw, dict) or metric not in raw:
                raise TrainingError(f"{type(self.module).__name__}.evaluate() returned no '{metric}' "
                                    f"(got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__})")
            metrics = {k: float(v) for k, v in raw.items()}
        if self.dist.enabled:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=0)
            metrics = holder[0]
        return metrics

    def _end_epoch(self, pos: _Position, metrics: dict[str, float], start_micro: int, train_time: float,
                   eval_time: float, reached_max: bool) -> None:
        cfg, info, module = self.config, self.dist, self.module
        samples = (pos.micro_batch - start_micro) * cfg.batch_size * info.world_size
        record = {
            "epoch": pos.epoch + 1,
            "step": pos.global_step,
            "train_loss": pos.loss_sum / max(1, pos.loss_count),
            "empty_batches": pos.empty_batches,
            "lr": self.scheduler.get_last_lr()[0],
            "val": metrics,
            "samples_per_s": samples / train_time if train_time > 0 else 0.0,
            "time_s": train_time,
            "eval_time_s": eval_time,
        }
        value = metrics[module.main_metric]
        improved = math.isfinite(value) and (
            pos.best_metric is None
            or (value > pos.best_metric if module.higher_is_better else value < pos.best_metric))
        if improved:
            pos.best_metric, pos.best_epoch, pos.bad_epochs = value, pos.epoch + 1, 0
        else:
            pos.bad_epochs += 1
        pos.history.append(record)
        pos.stopped_early = cfg.patience is not None and pos.bad_epochs >= cfg.patience
        pos.epoch += 1
        pos.micro_batch, pos.loss_sum, pos.loss_count, pos.empty_batches = 0, 0.0, 0, 0
        pos.finished = pos.stopped_early or reached_max or pos.epoch >= cfg.epochs
        if info.is_main:
            if improved:
                ckpt.save_best(self.run_dir / ckpt.BEST_FILE, module.trainable_state_dict(), record["epoch"],
                               module.main_metric, value)
            with atomic_write(self.run_dir / ckpt.METRICS_FILE, "w") as handle:
                handle.writelines(json.dumps(entry) + "\n" for entry in pos.history)
            self._plot(pos, force=False)
            self.progress.epoch_line(record)
            if pos.stopped_early:
                self.progress.print(f"early stopping: no better {module.main_metric} for {pos.bad_epochs} epoch(s)")
        self._save_last(pos)

    def _plot(self, pos: _Position, force: bool) -> None:
        if not self.dist.is_main or not pos.history:
            return
        if force or time.monotonic() - self._last_plot >= PLOT_INTERVAL_S:
            plot_curves(pos.history, self.run_dir / ckpt.CURVES_FILE, self.module.main_metric)
            self._last_plot = time.monotonic()

    def _save_last(self, pos: _Position, rng: dict | None = None) -> None:
        """Collective: gather every rank's RNG state; rank 0 writes last.pt. Every rank checks the
        (replicated) weights for NaN/inf, so all ranks fail together."""
        rng = rng if rng is not None else capture_rng()
        rngs = [rng]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng)
        trainable = self.module.trainable_state_dict()
        names = [k for k, v in trainable.items() if v.is_floating_point()]
        finite = torch.stack([torch.isfinite(trainable[k]).all() for k in names]).tolist() if names else []
        bad = [k for k, ok in zip(names, finite) if not ok]
        if bad:
            raise TrainingError(f"non-finite trainable weights ({bad[0]}) at optimiser step {pos.global_step}; "
                                f"{self.run_dir / ckpt.LAST_FILE} was left untouched")
        if not self.dist.is_main:
            return
        ckpt.save_checkpoint(self.run_dir / ckpt.LAST_FILE, {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": asdict(pos),
            "rng": rngs,
        })

    def _interrupted(self, pos: _Position) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"interrupted in epoch {pos.epoch + 1} after optimiser step {pos.global_step}/{self.total_steps}; "
            f"resumable checkpoint {self.run_dir / ckpt.LAST_FILE}: run the same command with --resume to continue")
