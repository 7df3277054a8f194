"""The one console progress bar: throughput with its unit, ETA, the resume note, off without a
terminal or when quiet; the training run's epoch lines and table."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from rich.console import Console
from rich.progress import Progress

from mora_retrieval.progress import ProgressBar, Throughput, TrainProgress


def _console(terminal: bool, quiet: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=200, quiet=quiet, color_system=None), out


def _plain(out: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def test_throughput_is_speed_times_scale_with_its_unit():
    clock = [0.0]
    progress = Progress(get_time=lambda: clock[0])
    task_id = progress.add_task("x", total=100, scale=32)
    for _ in range(4):  # 5 steps per second
        clock[0] += 1.0
        progress.advance(task_id, 5)
    task = progress.tasks[0]
    assert str(Throughput("samples/s").render(task)) == f"{5 * 32:,.1f} samples/s"
    plain = progress.add_task("y", total=10)
    assert str(Throughput("img/s").render(progress.tasks[plain])) == "– img/s"  # no speed yet


def test_bar_on_a_terminal_shows_count_throughput_eta_and_the_resume_note():
    console, out = _console(terminal=True)
    with ProgressBar(console, "embedding 10 images", "img/s") as bar:
        assert bar.live
        bar.start(10, completed=4)
        bar.advance(6)
    text = _plain(out)
    assert "embedding 10 images (resumed at 4)" in text and "10/10" in text
    assert "img/s" in text and "ETA" in text


def test_bar_extra_columns_and_description_changes():
    console, out = _console(terminal=True)
    with ProgressBar(console, "shapes world", "img/s", "loss {task.fields[loss]}") as bar:
        bar.start(3, loss="–")
        bar.advance(2, description="coco", loss="0.25")
        bar.advance()
    text = _plain(out)
    assert "coco" in text and "3/3" in text and "loss 0.25" in text


def test_bar_is_off_without_a_terminal_quiet_or_console():
    for console, out in (_console(terminal=False), _console(terminal=True, quiet=True)):
        with ProgressBar(console, "evaluate", "samples/s") as bar:
            bar.start(5)
            bar.advance(5)
        assert not bar.live and out.getvalue() == ""
    with ProgressBar(None, "evaluate", "samples/s") as bar:  # no console: every call is a no-op
        bar.start(5)
        bar.advance(5, description="x")
    assert not bar.live


def _record(epoch: int, loss: float, acc: float) -> dict:
    return {"epoch": epoch, "train_loss": loss, "val": {"acc": acc, "note": "text"}, "samples_per_s": 123.456,
            "time_s": 2.5}


def test_training_output_without_a_terminal_is_one_line_per_epoch_then_the_table():
    console, out = _console(terminal=False)
    history = [_record(1, 0.9, 0.5), _record(2, 0.7, 0.75)]
    with TrainProgress(console, quiet=False) as progress:
        progress.start(total_steps=20, done_steps=0, samples_per_step=8, epoch=1)
        for record in history:
            progress.advance()
            progress.update(loss=record["train_loss"])
            progress.epoch_line(record)
    progress.final_table(SimpleNamespace(best_epoch=2, history=history), "acc")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["epoch 1: train loss 0.9000, acc 0.5000, 123.5 samples/s, 2.5 s",
                         "epoch 2: train loss 0.7000, acc 0.7500, 123.5 samples/s, 2.5 s"]
    table = "\n".join(lines[2:])
    assert "best epoch 2 (acc)" in table and "0.7500" in table and "text" in table


def test_training_bar_on_a_terminal_shows_epoch_loss_and_samples_per_second():
    console, out = _console(terminal=True)
    with TrainProgress(console, quiet=False) as progress:
        progress.start(total_steps=6, done_steps=2, samples_per_step=8, epoch=2)
        progress.update(epoch=3)
        for _ in range(4):
            progress.advance()
        progress.update(loss=0.125)
    text = _plain(out)
    assert "epoch 3" in text and "6/6" in text and "loss 0.1250" in text
    assert "samples/s" in text and "ETA" in text


def test_training_output_quiet_or_not_rank_zero_prints_nothing():
    for kwargs in ({"quiet": True}, {"quiet": False, "enabled": False}):
        console, out = _console(terminal=True)
        with TrainProgress(console, **kwargs) as progress:
            progress.start(total_steps=4, done_steps=0, samples_per_step=2, epoch=1)
            progress.advance()
            progress.epoch_line(_record(1, 0.5, 0.5))
            progress.print("early stopping")
        progress.final_table(SimpleNamespace(best_epoch=1, history=[_record(1, 0.5, 0.5)]), "acc")
        assert out.getvalue() == ""


def test_cli_bars_on_a_terminal_show_their_unit_and_eta(tmp_path):
    """`data shapes`, `index coco` and `eval coco --mode cir` draw the one bar (forced terminal)."""
    import typer
    from retrieval_fixtures import write_tiny_checkpoint, write_tiny_coco
    from typer.testing import CliRunner

    from mora_retrieval_cli.app import build_app

    app = typer.Typer(rich_markup_mode=None)
    app.callback()(lambda: None)
    build_app(app, ("data", "index", "eval"))
    write_tiny_coco(tmp_path / "coco")
    write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    model = ["--model", "mora-tiny", "--pretrained", str(tmp_path / "tiny.safetensors"), "--device", "cpu"]
    runs = {
        "hateful_memes": ["data", "shapes", "--out", str(tmp_path / "w"), "--size", "tiny", "--image-size", "32"],
        "embedding 9 images": ["index", "coco", "--data-root", str(tmp_path / "coco"), *model,
                               "--out", str(tmp_path / "idx"), "--workers", "0", "--batch-size", "4"],
        "re-encoding for cir queries": ["eval", "coco", "--index", str(tmp_path / "idx"), "--mode", "cir",
                                        "--workers", "0", "--batch-size", "4", *model],
    }
    for description, args in runs.items():
        result = CliRunner().invoke(app, args, env={"FORCE_COLOR": "1", "COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        bars = [line for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.output).splitlines()
                if description in line and "img/s" in line and "ETA" in line]
        assert bars, (description, result.output)


def test_without_a_terminal_a_plain_line_at_most_every_log_every_seconds():
    clock = [0.0]
    console, out = _console(terminal=False)
    with ProgressBar(console, "embedding 100 images", "img/s", clock=lambda: clock[0]) as bar:
        bar.log_every = 10.0
        bar.start(100, completed=20)  # a resumed run: the rate counts this process's work only
        for t in (5.0, 10.0, 15.0):
            clock[0] = t
            bar.advance(10)
    # one line at t=10: 20 images in 10 s, 60 left at 2 images/s
    assert out.getvalue().splitlines() == ["embedding 100 images: 40/100, 2.0 img/s, ETA 0:00:30"]

    clock[0] = 0.0
    console, out = _console(terminal=False)
    with TrainProgress(console, quiet=False, clock=lambda: clock[0]) as progress:
        progress.log_every = 60.0
        progress.start(total_steps=100, done_steps=0, samples_per_step=8, epoch=1)
        progress.update(epoch=2, loss=0.25)
        for step in range(1, 31):
            clock[0] = 2.0 * step
            progress.advance()
    assert out.getvalue().splitlines() == ["epoch 2: 30/100 steps, 4.0 samples/s, ETA 0:02:20, loss 0.2500"]
    for console, out in (_console(terminal=False, quiet=True), _console(terminal=True)):  # quiet; a bar instead
        with ProgressBar(console, "x", "img/s", clock=lambda: clock[0]) as bar:
            bar.log_every = 0.0
            bar.start(2)
            bar.advance(2)
        assert "x: 2/2" not in _plain(out)
