"""Console output of a training run: a rich progress bar and the final table.

The bar shows the epoch, steps, last synced loss, samples/s and ETA. It is off when the
console is not a terminal (log files, CI): then one line per epoch is printed instead. With
``quiet`` nothing is printed at all. Only rank 0 prints.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


class SamplesPerSecond(ProgressColumn):
    """Rich's step speed times the samples per step (the task field ``samples_per_step``, 1 if absent)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("– samples/s", style="progress.data.speed")
        return Text(f"{speed * task.fields.get('samples_per_step', 1):,.1f} samples/s",
                    style="progress.data.speed")


class TrainProgress:
    """Progress reporting for :class:`~mora_retrieval.engine.trainer.Trainer` (rank 0 only)."""

    def __init__(self, console: Console | None, quiet: bool, enabled: bool = True) -> None:
        self.quiet = quiet or not enabled
        self.console = None if self.quiet else (console or Console())
        self.live = self.console is not None and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "TrainProgress":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), SamplesPerSecond(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, total_steps: int, done_steps: int, samples_per_step: int, epoch: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task("train", total=total_steps, completed=done_steps,
                                                 epoch=epoch, loss="–", samples_per_step=samples_per_step)

    def advance(self) -> None:
        if self._task is not None:
            self._progress.advance(self._task)

    def update(self, epoch: int | None = None, loss: float | None = None) -> None:
        if self._task is not None:
            fields = {}
            if epoch is not None:
                fields["epoch"] = epoch
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self._progress.update(self._task, **fields)

    def print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def epoch_line(self, record: dict[str, Any]) -> None:
        """One line per epoch (always printed, bar or not, unless quiet)."""
        vals = ", ".join(f"{k} {v:.4f}" for k, v in record["val"].items() if isinstance(v, (int, float)))
        self.print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, {vals}, "
                   f"{record['samples_per_s']:.1f} samples/s, {record['time_s']:.1f} s")

    def final_table(self, result: Any, main_metric: str) -> None:
        """The best epoch's validation metrics."""
        if self.console is None:
            return
        table = Table(title=f"best epoch {result.best_epoch} ({main_metric})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        best = next((r for r in result.history if r["epoch"] == result.best_epoch), None)
        for key, value in (best or {}).get("val", {}).items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, (int, float)) else str(value))
        self.console.print(table)
