"""`mora-ret train cirr` as a new user meets it: bad images, failed starts, resumes, limits, messages."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mora_retrieval.errors import MoraError
from mora_retrieval_cli.app import app

COMMON = ("--model", "mora-tiny", "--pretrained", "none", "--epochs", "1", "--batch-size", "8",
          "--combiner-epochs", "1", "--combiner-batch-size", "8", "--device", "cpu", "--workers", "0")


def _train(*args):
    return CliRunner().invoke(app, ["train", "cirr", *map(str, args)], terminal_width=200)


def _error(result) -> str:
    assert isinstance(result.exception, MoraError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


def _split_paths(root, split):
    return json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())


def test_unreadable_train_and_val_images_are_left_out_and_counted(world, tmp_path):
    root = tmp_path / "cirr"
    shutil.copytree(world["cirr"], root)
    val = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    train = json.loads((root / "captions" / "cap.rc2.train.json").read_text())
    for split, name in (("train", train[0]["reference"]), ("val", val[0]["target_hard"])):
        path = root / _split_paths(root, split)[name]
        path.write_bytes(path.read_bytes()[:40])  # truncated
    for flag in ("--prepared", "--no-prepared"):  # the prepared cache, and the image files every epoch
        run = tmp_path / f"run{flag}"
        result = _train("--data-root", root, "--run-dir", run, "--skip-bad-images", flag, *COMMON)
        assert result.exit_code == 0, result.output
        dropped = json.loads((run / "results.json").read_text())["dropped_triplets"]
        assert dropped["val"] >= 1 and dropped["train"] >= 1, (flag, dropped)
        assert "left out for unreadable images:" in " ".join(result.output.split())
        assert "stage 2: the Combiner on cached features of" in result.output


def test_a_failed_start_blocks_no_retry_and_writes_nothing(world, tmp_path):
    run = tmp_path / "run"
    assert "not found" in _error(_train("--data-root", tmp_path / "nope", "--run-dir", run, *COMMON))
    message = _error(_train("--data-root", world["cirr"], "--run-dir", run, *COMMON, "--combiner-batch-size", "512"))
    assert "(Combiner) of 40 samples gives no full optimiser step" in message and "at most 40" in message
    assert "nope.bin: checkpoint file not found" in _error(
        _train("--data-root", world["cirr"], "--run-dir", run, *COMMON[:2], "--pretrained", "nope.bin", *COMMON[4:]))
    assert not run.exists()  # nothing was written by any of the failed starts
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file, so" in _error(_train("--data-root", world["cirr"], "--run-dir", blocker / "run", *COMMON))
    # a run folder whose stage 1 never reached a checkpoint starts again without --resume
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "cir"}))
    result = _train("--data-root", world["cirr"], "--run-dir", run, *COMMON)
    assert result.exit_code == 0, result.output
    assert "already holds a run" in _error(_train("--data-root", world["cirr"], "--run-dir", run, *COMMON))


def test_resume_names_the_changed_setting_and_lets_paths_move(world, tmp_path):
    run = tmp_path / "run"
    assert _train("--data-root", world["cirr"], "--run-dir", run, *COMMON, "--lr", "0.01").exit_code == 0
    message = _error(_train("--data-root", world["cirr"], "--run-dir", run, *COMMON, "--lr", "0.05", "--resume"))
    assert "cannot resume: stage1.lr was 0.01, now 0.05" in message
    moved = tmp_path / "moved-cirr"
    shutil.copytree(world["cirr"], moved)
    result = _train("--data-root", moved, "--run-dir", run, *COMMON, "--lr", "0.01", "--resume", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["data_root"] == str(moved)


def test_max_steps_limits_both_stages(world, tmp_path):
    run = tmp_path / "run"
    result = _train("--data-root", world["cirr"], "--run-dir", run, *COMMON[:4], "--epochs", "3", "--batch-size", "4",
                    "--combiner-epochs", "3", "--combiner-batch-size", "4", "--device", "cpu", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    for stage in ("stage1", "stage2"):
        steps = [json.loads(line)["step"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, (stage, steps)


def test_eval_cirr_refuses_another_task_run(tmp_path):
    run = tmp_path / "classify-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "classify", "arch": "mora-tiny", "dataset": "food101"}))
    result = CliRunner().invoke(app, ["eval", "cirr", "--run", str(run)])
    assert "not a CIR run (task 'classify'); eval cirr needs a folder written by" in _error(result)
