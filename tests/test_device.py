"""The one device/precision rule (mora_retrieval.device), tested as a pure function of the GPU count."""

from __future__ import annotations

import pytest
import torch

from mora_retrieval.device import autocast, device_for, inference_dtype, resolve_device, resolve_precision
from mora_retrieval.errors import DeviceError


@pytest.mark.parametrize("spec,rank,count,want", [
    ("auto", 0, 0, "cpu"), (None, 3, 0, "cpu"), ("cpu", 5, 8, "cpu"),
    ("auto", 0, 1, "cuda:0"), ("auto", 3, 8, "cuda:3"), ("cuda", 2, 4, "cuda:2"),
    ("cuda:1", 0, 2, "cuda:1"), ("CUDA:0", 7, 8, "cuda:0"),
])
def test_device_rule(spec, rank, count, want):
    assert device_for(spec, rank, count) == want


def test_more_ranks_than_gpus_is_one_line_with_the_fix():
    # torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 has no GPU of its own.
    with pytest.raises(DeviceError) as err:
        device_for("auto", 1, 1, world_size=2)
    message = str(err.value)
    assert "\n" not in message and "--nproc_per_node 1" in message and "--device cpu" in message
    assert "invalid device ordinal" not in message
    with pytest.raises(DeviceError, match="--nproc_per_node 2 or fewer"):
        device_for("cuda", 2, 2, world_size=4)
    assert device_for("cpu", 1, 1, world_size=2) == "cpu"  # CPU + gloo when asked for


@pytest.mark.parametrize("spec,count,match", [
    ("cuda", 0, "CUDA is not available"), ("cuda:0", 0, "CUDA is not available"),
    ("cuda:2", 2, r"cuda:2' does not exist: 2 GPU\(s\) visible"), ("tpu", 1, "unknown device 'tpu'"),
    ("cuda:x", 1, "unknown device"),
])
def test_bad_devices(spec, count, match):
    with pytest.raises(DeviceError, match=match):
        device_for(spec, 0, count)


def test_resolve_on_this_machine(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == want
    assert resolve_device(torch.device("cpu")).type == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "1")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"  # ranks run on CPU (gloo) without GPUs


def test_precision_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision(None, cpu) == "fp32"
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("fp32", cuda) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(DeviceError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", cpu)
    assert inference_dtype(cpu) == torch.float32 and inference_dtype(cuda) == torch.bfloat16
    assert inference_dtype(cuda, "fp32") == torch.float32


def test_autocast_helper_on_cpu():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize("device,cores,local_world,want", [
    ("cuda", 16, 1, 8), ("cuda", 16, 2, 7), ("cuda", 4, 1, 3), ("cuda", 2, 2, 0), ("cuda", 1, 1, 0),
    ("cpu", 16, 1, 0), ("cpu", 2, 1, 0),
])
def test_default_workers_rule(device, cores, local_world, want):
    from mora_retrieval.device import default_num_workers

    assert default_num_workers(device, cores, local_world) == want
