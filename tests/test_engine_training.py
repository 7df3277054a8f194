"""Trainer behaviour: exact resume, Ctrl-C, NaN guard, best/early stopping, accumulation, files."""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode

from engine_toys import ToyData, ToyTask, params_of
from mora_retrieval.data.collate import collate_skip_none
import mora_retrieval.engine
from mora_retrieval.engine import Trainer, TrainConfig, TrainingInterrupted, lr_factor, resume_or_fail
from mora_retrieval.engine.checkpoint import BEST_FILE, LAST_FILE, load_checkpoint
from mora_retrieval.engine.sampling import ResumableSampler
from mora_retrieval.errors import DeviceError, TrainingError
from mora_retrieval.fileio import load_tensors


def cfg(**kw) -> TrainConfig:
    """A CPU run: these tests are about the loop's semantics, whatever the machine has."""
    base = dict(epochs=3, batch_size=4, lr=0.05, weight_decay=0.01, seed=7, log_every=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def fit(task, run, config, data=None, resume=False, **kw):
    return Trainer(task, config, run, data or ToyData(48), quiet=True, **kw).fit(resume=resume)


def history_without_times(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        for key in ("samples_per_s", "time_s", "eval_time_s"):
            rec.pop(key)
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference runs (dropout on, so RNG restoring matters), one per grad_accum, made once."""
    runs = {}

    def get(accum: int):
        if accum not in runs:
            run = tmp_path_factory.mktemp(f"reference{accum}")
            task = ToyTask(dropout=0.3)
            fit(task, run, cfg(grad_accum=accum))
            runs[accum] = (task, run)
        return runs[accum]

    return get


# 48 samples / batch 4 = 12 micro-batches per epoch; 3 epochs. Interrupts: mid-epoch; inside an
# accumulation group (rolled back to its start); on the first forward of an epoch (accum 2 / 1).
@pytest.mark.parametrize("accum,interrupt_at", [(1, 17), (2, 16), (2, 13), (1, 25)])
def test_interrupt_then_resume_is_bit_exact(tmp_path, uninterrupted, accum, interrupt_at):
    config = cfg(grad_accum=accum)
    reference, ref_run = uninterrupted(accum)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        fit(ToyTask(dropout=0.3, interrupt_at=interrupt_at), tmp_path / "b", config)
    state = load_checkpoint(tmp_path / "b" / LAST_FILE)
    # rolled back to the last finished optimiser step before the failing forward
    done = interrupt_at - 1
    assert state["position"]["global_step"] == done // accum
    assert state["position"]["micro_batch"] == (done - done % accum) % 12
    resumed = ToyTask(dropout=0.3)
    result = fit(resumed, tmp_path / "b", config, resume=True)

    for key, value in params_of(reference).items():
        assert torch.equal(value, params_of(resumed)[key]), key
    hist_a, hist_b = history_without_times(ref_run), history_without_times(tmp_path / "b")
    for rec_a, rec_b in zip(hist_a, hist_b, strict=True):
        # the logged loss is summed in fp32 over log windows, which the interruption splits
        assert rec_b.pop("train_loss") == pytest.approx(rec_a.pop("train_loss"), rel=1e-6)
        assert rec_a == rec_b
    assert result.global_step == 3 * 12 // accum


def test_sigint_stops_at_step_boundary_and_resumes_exactly(tmp_path, uninterrupted):
    config = cfg()
    reference, _ = uninterrupted(1)
    with pytest.raises(TrainingInterrupted, match="after optimiser step 20/36"):
        fit(ToyTask(dropout=0.3, sigint_at=20), tmp_path / "b", config)  # the step in flight completes
    assert (tmp_path / "b" / "curves.png").is_file()
    resumed = ToyTask(dropout=0.3)
    fit(resumed, tmp_path / "b", config, resume=True)
    for key, value in params_of(reference).items():
        assert torch.equal(value, params_of(resumed)[key]), key


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    config = cfg(log_every=100, checkpoint_every=16)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) in epoch 2, optimiser steps 13-16"):
        fit(ToyTask(nan_at=14), tmp_path, config)
    state = load_checkpoint(tmp_path / LAST_FILE)  # still the end of epoch 1, loadable
    assert state["position"]["epoch"] == 1 and state["position"]["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    best = load_tensors(tmp_path / BEST_FILE)
    assert all(torch.equal(best[k], state["trainable"][k]) for k in best)
    task = ToyTask()
    task.load_trainable_state_dict(state["trainable"])
    assert "last.pt (the last good state) was left untouched" in str(
        pytest.raises(TrainingError, fit, ToyTask(nan_at=14), tmp_path / "again", config).value)


def test_nan_before_any_checkpoint_names_no_file(tmp_path):
    with pytest.raises(TrainingError, match=r"optimiser steps 1-3; no checkpoint had been written yet") as info:
        fit(ToyTask(nan_at=2), tmp_path, cfg())
    assert "last.pt" not in str(info.value)


def test_best_checkpoint_and_early_stopping(tmp_path):
    script = [0.5, 0.4, 0.45, 0.3, 0.35, 0.36, 0.2, 0.1]
    task = ToyTask(script=script)
    result = fit(task, tmp_path, cfg(epochs=8, patience=2))
    assert result.stopped_early and len(result.history) == 6
    assert (result.best_epoch, result.best_metric) == (4, 0.3)
    best = load_tensors(result.best_checkpoint)
    assert set(best) == set(task.snapshots[3])
    assert all(torch.equal(best[k], task.snapshots[3][k]) for k in best)
    assert [r["val"]["aux"] for r in result.history] == [1, 2, 3, 4, 5, 6]

    up = ToyTask(script=[0.1, 0.7, 0.2], higher_is_better=True)
    result = fit(up, tmp_path / "up", cfg(epochs=3))
    assert (result.best_epoch, result.best_metric, result.stopped_early) == (2, 0.7, False)
    # a finished run resumes to the same result without training
    again = fit(ToyTask(script=[9.0]), tmp_path / "up", cfg(epochs=3), resume=True)
    assert (again.best_epoch, len(again.history)) == (2, 3)


def test_grad_accumulation_matches_larger_batch(tmp_path):
    big, small = ToyTask(), ToyTask()
    fit(big, tmp_path / "big", cfg(epochs=2, batch_size=8))
    fit(small, tmp_path / "small", cfg(epochs=2, batch_size=4, grad_accum=2))
    for key, value in params_of(big).items():
        torch.testing.assert_close(params_of(small)[key], value, rtol=1e-5, atol=1e-6)


def test_run_folder_files(tmp_path):
    task = ToyTask()
    out = io.StringIO()
    config = cfg(epochs=2, max_grad_norm=1.0)
    result = Trainer(task, config, tmp_path, ToyData(48), console=Console(file=out, width=200),
                     extra_config={"task": "toy", "dims": (8, 16)}).fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(saved["train"]) == config
    assert saved["extra"] == {"task": "toy", "dims": [8, 16]}
    assert saved["resolved"]["effective_batch_size"] == 4 and saved["resolved"]["precision"] == "fp32"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [12, 24]
    assert records[0]["lr"] == pytest.approx(0.05 * lr_factor(12, 24, 2))
    assert records[1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(r["samples_per_s"] > 0 and "mse" in r["val"] for r in records)
    assert [r["val"]["mse"] for r in records] == [r["val"]["mse"] for r in result.history]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # frozen weights are in neither checkpoint
    last = load_checkpoint(tmp_path / LAST_FILE)
    for keys in (set(last["trainable"]), set(load_tensors(tmp_path / BEST_FILE))):
        assert keys == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias", "scale"}
    text = out.getvalue()  # not a terminal: no bar, one line per epoch, then the table
    assert "epoch 1: train loss" in text and "epoch 2: train loss" in text and "best epoch" in text


def test_resume_checks(tmp_path):
    with pytest.raises(TrainingError, match="cannot resume: .*config.json"):
        fit(ToyTask(), tmp_path, cfg(), resume=True)
    fit(ToyTask(), tmp_path, cfg(epochs=1))
    with pytest.raises(TrainingError, match="already holds a run"):
        fit(ToyTask(), tmp_path, cfg(epochs=1))
    with pytest.raises(TrainingError, match=r"cannot resume: lr was 0.05, now 0.01"):
        fit(ToyTask(), tmp_path, cfg(epochs=1, lr=0.01), resume=True)
    with pytest.raises(TrainingError, match="task settings changed \\(rank\\)"):
        fit(ToyTask(), tmp_path, cfg(epochs=1), resume=True, extra_config={"rank": 4})
    with pytest.raises(TrainingError, match="cannot resume: the training set had 48 samples, now 40"):
        fit(ToyTask(), tmp_path, cfg(epochs=1), ToyData(40), resume=True)
    # settings that do not change training may differ
    assert resume_or_fail(tmp_path, cfg(epochs=1, log_every=1, num_workers=2, patience=3)).name == "last.pt"
    (tmp_path / LAST_FILE).write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="not a readable engine checkpoint"):
        fit(ToyTask(), tmp_path, cfg(epochs=1), resume=True)


def test_max_steps_and_too_small_dataset(tmp_path):
    result = fit(ToyTask(), tmp_path / "m", cfg(epochs=5, max_steps=7))
    assert result.global_step == 7 and len(result.history) == 1 and result.history[0]["step"] == 7
    with pytest.raises(TrainingError, match="no full optimiser step"):
        fit(ToyTask(), tmp_path / "s", cfg(batch_size=32, grad_accum=2))


def test_workers_give_the_same_run_and_bf16_autocast(tmp_path):
    serial, workers = ToyTask(), ToyTask()
    fit(serial, tmp_path / "w0", cfg(epochs=2))
    fit(workers, tmp_path / "w2", cfg(epochs=2, num_workers=2))
    for key, value in params_of(serial).items():
        assert torch.equal(value, params_of(workers)[key]), key
    assert serial.last_dtype == torch.float32  # precision "auto" is fp32 on CPU

    half = ToyTask()
    result = fit(half, tmp_path / "bf16", cfg(epochs=2, precision="bf16"))
    assert half.last_dtype == torch.bfloat16  # the forward ran under bf16 autocast
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["resolved"]["precision"] == "bf16"
    assert half.net[0].weight.dtype == torch.float32  # master weights stay fp32
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_auto_device_and_precision_follow_this_machine(tmp_path):
    task = ToyTask()
    result = fit(task, tmp_path, cfg(epochs=2, device="auto"))
    resolved = json.loads((tmp_path / "config.json").read_text())["resolved"]
    if torch.cuda.is_available():
        assert task.last_dtype == torch.bfloat16 and task.net[0].weight.device.type == "cuda"
        assert (resolved["device"], resolved["precision"]) == ("cuda:0", "bf16")
    else:
        assert task.last_dtype == torch.float32 and task.net[0].weight.device.type == "cpu"
        assert (resolved["device"], resolved["precision"]) == ("cpu", "fp32")
        assert resolved["num_workers"] == 0  # workers would take the model's cores on CPU
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.gpu
def test_cuda_bf16_training_tracks_fp32(tmp_path):
    """bf16 autocast on CUDA ends within bf16's tolerance of the fp32 run on CUDA."""
    bf16, fp32 = ToyTask(), ToyTask()
    fit(bf16, tmp_path / "bf16", cfg(epochs=2, device="cuda", precision="bf16"))
    fit(fp32, tmp_path / "fp32", cfg(epochs=2, device="cuda", precision="fp32"))
    assert bf16.last_dtype == torch.bfloat16 and fp32.last_dtype == torch.float32
    for key, value in params_of(fp32).items():
        torch.testing.assert_close(params_of(bf16)[key], value, rtol=5e-2, atol=5e-3)


class _VectorLoss(ToyTask):
    def forward(self, batch):
        return (self.net(self.frozen(batch["x"])) - batch["y"]) ** 2  # not reduced


class _NoMetric(ToyTask):
    def evaluate(self, device):
        return {"accuracy": 1.0}


def test_task_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(TrainingError, match="forward must return a scalar loss"):
        fit(_VectorLoss(), tmp_path / "v", cfg(epochs=1))
    with pytest.raises(TrainingError, match=r"evaluate\(\) returned no 'mse' \(got \['accuracy'\]\)"):
        fit(_NoMetric(), tmp_path / "m", cfg(epochs=1))
    with pytest.raises(TrainingError, match="map-style dataset"):
        fit(ToyTask(), tmp_path / "i", cfg(epochs=1), data=iter(range(3)))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            fit(ToyTask(), tmp_path / "c", cfg(epochs=1, device="cuda"))


class _BadBatches(ToyData):
    """ToyData whose items at ``bad`` are ``None`` (bad images under ``skip_bad_images=True``)."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int):
        return None if i in self.bad else super().__getitem__(i)


def _empty_batch_data(config: TrainConfig, epoch_batches: dict[int, list[int]]) -> _BadBatches:
    """48 samples whose per-epoch batches named in ``epoch_batches`` are all bad (the sampler's order)."""
    sampler = ResumableSampler(48, config.batch_size, config.seed)
    bad = set()
    for epoch, batches in epoch_batches.items():
        sampler.set_epoch(epoch)
        order = list(sampler)
        for b in batches:
            bad.update(order[b * config.batch_size:(b + 1) * config.batch_size])
    return _BadBatches(48, bad)


def _empty_batches_per_epoch(data: _BadBatches, config: TrainConfig) -> list[int]:
    sampler = ResumableSampler(48, config.batch_size, config.seed)
    counts = []
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[k:k + config.batch_size] for k in range(0, 48, config.batch_size)]
        counts.append(sum(all(i in data.bad for i in batch) for batch in batches))
    return counts


@pytest.mark.parametrize("accum,interrupt_at", [(1, 6), (2, 4), (2, 15)])
def test_batches_of_only_bad_images_are_skipped_counted_and_resume_exactly(tmp_path, accum, interrupt_at):
    config = cfg(grad_accum=accum)
    data = _empty_batch_data(config, {0: [2, 3], 1: [5]})  # epoch 1: a whole accumulation group
    expected = _empty_batches_per_epoch(data, config)
    assert expected[:2] == [2, 1]
    collate = collate_skip_none
    reference = ToyTask(dropout=0.3)
    fit(reference, tmp_path / "a", config, data, collate_fn=collate)
    records = history_without_times(tmp_path / "a")
    assert [r["empty_batches"] for r in records] == expected
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in records)
    # the forwards that ran are exactly the non-empty micro-batches
    assert reference.forwards == 3 * 12 - sum(expected)

    with pytest.raises(TrainingInterrupted):
        fit(ToyTask(dropout=0.3, interrupt_at=interrupt_at), tmp_path / "b", config, data, collate_fn=collate)
    resumed = ToyTask(dropout=0.3)
    fit(resumed, tmp_path / "b", config, data, resume=True, collate_fn=collate)
    for key, value in params_of(reference).items():
        assert torch.equal(value, params_of(resumed)[key]), key
    for rec_a, rec_b in zip(records, history_without_times(tmp_path / "b"), strict=True):
        assert rec_b.pop("train_loss") == pytest.approx(rec_a.pop("train_loss"), rel=1e-6)
        assert rec_a == rec_b


def test_an_empty_batch_adds_no_gradient(tmp_path):
    """A group of one real and one empty micro-batch steps on the real loss / grad_accum; a group of
    two empty ones steps with no gradient at all."""
    config = cfg(epochs=1, grad_accum=2)
    data = _empty_batch_data(config, {0: [1, 4, 5]})
    task = ToyTask()
    grads = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append(task.net[0].weight.grad))
    try:
        fit(task, tmp_path, config, data, collate_fn=collate_skip_none)
    finally:
        hook.remove()
    assert len(grads) == 6 and grads[2] is None and all(g is not None for i, g in enumerate(grads) if i != 2)
    first = collate_skip_none([data[i] for i in list(ResumableSampler(48, 4, config.seed))[:4]])
    check = ToyTask()
    (check(first) / 2).backward()
    torch.testing.assert_close(grads[0], check.net[0].weight.grad)


#: Calls that wait for a CUDA device: reading a value on the host, or ``torch.tensor`` copying a host
#: value to the device from pageable memory.
HOST_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "tensor"}
ENGINE_DIR = Path(mora_retrieval.engine.__file__).parent
#: torch's own dispatch frames between a Tensor method and its caller.
DISPATCH_FILES = {Path(torch.__file__).parent / name for name in ("overrides.py", "_tensor.py")}


class _EngineTensorCalls(TorchFunctionMode):
    """Records host reads and ``Tensor.to`` calls written in the engine's code. Reads inside torch (AdamW's
    step counter and the DataLoader's seed live on the host) or in the task are not the engine's."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter = Counter()
        self.moves: list[bool] = []  # non_blocking of each Tensor.to in to_device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_SYNCS or name == "to":
            frame = sys._getframe(1)
            while frame is not None and Path(frame.f_code.co_filename) in DISPATCH_FILES:
                frame = frame.f_back
            if frame is not None and Path(frame.f_code.co_filename).parent == ENGINE_DIR:
                where = frame.f_code.co_qualname
                if name == "to" and where == "to_device":
                    self.moves.append(kwargs.get("non_blocking", False))
                elif name != "to":
                    self.reads[(where, name)] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("log_every,accum", [(5, 1), (100, 1), (2, 2)])
def test_host_reads_only_at_log_points_and_checkpoints(tmp_path, log_every, accum):
    """The GPU contract, checked on CPU: the step loop reads the loss only at log points (every
    ``log_every`` optimiser steps and at the end of each epoch, one read each), the
    checkpoint's NaN check is one read, and every batch tensor moves with ``non_blocking=True``."""
    epochs, steps_per_epoch = 3, 12 // accum
    config = cfg(epochs=epochs, log_every=log_every, grad_accum=accum)
    calls = _EngineTensorCalls()
    with calls:
        fit(ToyTask(script=[3.0, 2.0, 1.0]), tmp_path, config)  # improves every epoch: 3 best checkpoints
    log_points = sum(1 for step in range(1, epochs * steps_per_epoch + 1)
                     if step % log_every == 0 or step % steps_per_epoch == 0)
    assert dict(calls.reads) == {
        ("Trainer._sync_window", "tolist"): log_points,
        ("Trainer._save_last", "tolist"): epochs,  # finiteness of all trainable tensors at once
        ("save_best.<locals>.<dictcomp>", "cpu"): epochs * 5,  # best.safetensors: 5 trainable tensors
    }
    assert calls.moves == [True] * (epochs * 12 * 2)  # x and y of every micro-batch
