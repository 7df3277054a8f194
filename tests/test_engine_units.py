"""Engine building blocks: schedule, config, sampler, device transfer, RNG, module defaults."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch

from engine_toys import ToyTask
from mora_retrieval.engine import ResumableSampler, TrainConfig, lr_factor, to_device
from mora_retrieval.engine.sampling import build_loader
from mora_retrieval.engine.config import build_scheduler
from mora_retrieval.errors import TrainingError


def reference_lr(step: int, total: int, ratio: float, base: float) -> float:
    warm = int(ratio * total)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


@pytest.mark.parametrize("total,ratio", [(20, 0.1), (37, 0.25), (10, 0.0)])
def test_scheduler_follows_closed_form(total, ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.5)
    sched = build_scheduler(opt, total, ratio)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([reference_lr(s, total, ratio, 0.5) for s in range(total)], rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # decayed to 0 after T steps
    if ratio:
        assert max(seen) == pytest.approx(0.5)  # the warm-up reaches the base lr


def test_lr_factor_shape():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # half-way through the cosine


def test_config_roundtrip_and_validation():
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, patience=2, max_grad_norm=1.0, betas=(0.8, 0.9))
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.betas == (0.8, 0.9)
    with pytest.raises(TrainingError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainingError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    for bad, message in [({"max_grad_norm": "x"}, r"max_grad_norm must be float \| None, got 'x'$"),
                         ({"epochs": None}, "epochs must be int, got None"),
                         ({"epochs": 2.5}, "epochs must be int, got 2.5"),
                         ({"patience": True}, r"patience must be int \| None, got True"),
                         ({"betas": ["a", 0.9]}, r"betas must be tuple\[float, float\], got \['a', 0\.9\]")]:
        with pytest.raises(TrainingError, match=message):
            TrainConfig(**bad)
    assert TrainConfig(lr=1, betas=[0.5, 0.9]).betas == (0.5, 0.9)  # a float takes an int, a tuple a list
    with pytest.raises(TrainingError, match="unknown field"):
        TrainConfig.from_dict({"epochs": 1, "lr_typo": 3})


def test_sampler_is_seeded_sharded_and_resumable():
    n, batch, world = 23, 3, 2
    single = ResumableSampler(n, batch * world, seed=5)
    ranks = [ResumableSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        order = list(single)
        assert sorted(order) == list(range(n))
        per_rank = [list(s) for s in ranks]
        for k in range(n // (batch * world)):  # step k of all ranks = batch k of one process
            together = sorted(i for r in per_rank for i in r[k * batch:(k + 1) * batch])
            assert together == sorted(order[k * batch * world:(k + 1) * batch * world])
    first, second = list(ResumableSampler(n, 4, seed=1)), list(ResumableSampler(n, 4, seed=2))
    assert first != second  # the seed changes the order
    resumed = ResumableSampler(n, 4, seed=5)
    resumed.set_epoch(1, start_batch=2)
    full = ResumableSampler(n, 4, seed=5)
    full.set_epoch(1)
    assert list(resumed) == list(full)[8:] and len(resumed) == n - 8
    # the order of epoch e is the permutation seeded with seed * 100003 + e (runs keep their data order)
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 100_003 + 1)).tolist()
    assert list(full) == expected and full.epoch_seed == 5 * 100_003 + 1


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_loader_pins_batches_for_cuda_only(device, pinned):
    """Pinned batches let ``to_device``'s non-blocking copies overlap with the GPU; on CPU pinning is waste."""
    loader = build_loader(list(range(8)), ResumableSampler(8, 2), None, 0, torch.device(device))
    assert loader.pin_memory is pinned and loader.drop_last and loader.batch_size == 2


def test_to_device_nested():
    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.ones(2), "items": [torch.zeros(1), (torch.ones(1), "txt")], "p": Pair(torch.ones(1), 3)}
    out = to_device(batch, "cpu")
    assert torch.equal(out["x"], batch["x"]) and out["items"][1][1] == "txt"
    assert isinstance(out["items"][1], tuple) and isinstance(out["p"], Pair) and out["p"].b == 3


def test_module_defaults_groups_and_state():
    task = ToyTask()
    sd = task.trainable_state_dict()
    assert set(sd) == {"net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias", "scale"}
    groups = task.optimizer_param_groups(TrainConfig(weight_decay=0.1))
    assert [len(g["params"]) for g in groups] == [2, 2]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    other = ToyTask(seed=3)
    other.load_trainable_state_dict(sd)
    assert torch.equal(other.net[0].weight, task.net[0].weight)
    assert not torch.equal(other.frozen.weight, task.frozen.weight)  # frozen part untouched
    with pytest.raises(TrainingError, match="missing .*net.3.bias"):
        other.load_trainable_state_dict({k: v for k, v in sd.items() if k != "net.3.bias"})
    bad = dict(sd, scale=torch.ones(2))
    with pytest.raises(TrainingError, match="scale has shape"):
        other.load_trainable_state_dict(bad)
