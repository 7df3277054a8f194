"""Console progress of every long loop (training, evaluation, embedding, dataset writing).

:class:`ProgressBar` is the one rich bar: description, bar, done/total, the caller's columns,
throughput with its unit, elapsed time and ETA; nothing without a console or on a quiet one. On a
console that is not a terminal (a log file, a cluster job's stderr) it prints instead one plain line
at most every ``log_every`` seconds. :class:`TrainProgress` adds a training run's epoch lines and
the table of the best epoch.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


class Throughput(ProgressColumn):
    """Rich's speed of the task times its field ``scale`` (units per step, 1 if absent), with the unit."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        value = "–" if speed is None else f"{speed * task.fields.get('scale', 1):,.1f}"
        return Text(f"{value} {self.unit}", style="progress.data.speed")


class ProgressBar:
    """One progress bar on ``console``, as a context manager (and the embedding pipeline's reporter);
    ``columns`` are rich text-column templates shown after the count (``"loss {task.fields[loss]}"``)."""

    #: Seconds between two plain progress lines on a console that is not a terminal.
    log_every: float = 60.0
    #: What the count counts, in the plain lines (e.g. "steps"; the description usually says it).
    count_noun: str = ""

    def __init__(self, console: Console | None, description: str, unit: str, *columns: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.description = description
        self.unit = unit
        self.live = console is not None and console.is_terminal and not console.quiet
        self.logs = console is not None and not console.is_terminal and not console.quiet
        self._clock = clock
        self._last_log = 0.0
        # the task counts for the plain lines too; only a live bar is drawn
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            *(TextColumn(template) for template in columns), Throughput(unit),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, get_time=clock, disable=not self.live)
        self._task: Any = None

    def __enter__(self) -> "ProgressBar":
        if self.live:  # older rich prints a blank line when even a disabled Progress stops
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self._progress.stop()

    def start(self, total: int, completed: int = 0, **fields: Any) -> None:
        """Show the task; work done before (a resumed run) is noted and not counted in the throughput."""
        note = f" (resumed at {completed})" if completed and self.live else ""
        self._task = self._progress.add_task(self.description + note, total=total, completed=completed,
                                             start_done=completed, **fields)
        self._last_log = self._clock()

    def advance(self, count: int = 1, **changes: Any) -> None:
        """``count`` more done; ``changes`` update the description or the task's fields."""
        self.update(**changes)
        self._progress.advance(self._task, count)
        if self.logs and (now := self._clock()) - self._last_log >= self.log_every:
            self._last_log = now
            self.console.print(self.log_line(now), highlight=False)

    def update(self, **changes: Any) -> None:
        if changes:
            self._progress.update(self._task, **changes)

    def log_line(self, now: float) -> str:
        """``description: done/total, throughput unit, ETA h:mm:ss``."""
        task = self._progress.tasks[-1]
        rate = (task.completed - task.fields["start_done"]) / max(now - task.start_time, 1e-9)  # this process
        left = datetime.timedelta(seconds=round((task.total - task.completed) / rate)) if rate > 0 else "–"
        noun = f" {self.count_noun}" if self.count_noun else ""
        return (f"{task.description}: {task.completed:,}/{task.total:,}{noun}, "
                f"{rate * task.fields.get('scale', 1):,.1f} {self.unit}, ETA {left}")


class TrainProgress(ProgressBar):
    """The console output of :class:`~mora_retrieval.engine.trainer.Trainer` (rank 0 only): the bar
    (epoch, steps, last synced loss, samples/s, ETA), one line per epoch and the final table."""

    count_noun = "steps"

    def __init__(self, console: Console | None, quiet: bool, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        console = None if quiet or not enabled else (console or Console())
        super().__init__(console, "train", "samples/s", "loss {task.fields[loss]}", clock=clock)

    def start(self, total_steps: int, done_steps: int, samples_per_step: int, epoch: int) -> None:
        super().start(total_steps, done_steps, scale=samples_per_step, loss="–")
        self.update(epoch=epoch)

    def update(self, epoch: int | None = None, loss: float | None = None, **changes: Any) -> None:
        if epoch is not None:
            changes["description"] = f"epoch {epoch}"
        if loss is not None:
            changes["loss"] = f"{loss:.4f}"
        super().update(**changes)

    def log_line(self, now: float) -> str:
        return f"{super().log_line(now)}, loss {self._progress.tasks[-1].fields['loss']}"

    def print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def epoch_line(self, record: dict[str, Any]) -> None:
        """One line per epoch (printed with or without the bar)."""
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
