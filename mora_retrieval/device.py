"""The one rule for device and precision, used by every command and library entry point.

Device ``"auto"`` (every command's default) is ``cuda:LOCAL_RANK`` when CUDA is available and
``cpu`` otherwise (``LOCAL_RANK`` is 0 outside ``torchrun``); ``"cuda"`` is the same GPU. Under
``torchrun`` with more processes per node than GPUs they stop with one line saying what to do
instead of asking CUDA for a device that does not exist. :func:`device_for` is the rule as a pure
function of the GPU count, tested without GPUs.

Precision ``"auto"`` is ``"bf16"`` on CUDA and ``"fp32"`` on CPU. Training runs bf16 as autocast
over fp32 master weights (:func:`autocast`); inference may cast its weights to bf16 once.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import DeviceError

PRECISIONS = ("auto", "bf16", "fp32")


def device_for(spec: str | None, local_rank: int, cuda_count: int, world_size: int = 1) -> str:
    """The device string for ``spec`` on a process with ``local_rank``, given ``cuda_count`` GPUs."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu" or (spec == "auto" and cuda_count == 0):
        return "cpu"
    if spec not in ("auto", "cuda") and not (spec.startswith("cuda:") and spec[5:].isdigit()):
        raise DeviceError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)")
    if cuda_count == 0:
        raise DeviceError(f"device {spec!r} requested but CUDA is not available (use --device cpu)")
    if spec.startswith("cuda:"):
        if int(spec[5:]) >= cuda_count:
            raise DeviceError(f"device {spec!r} does not exist: {cuda_count} GPU(s) visible "
                              f"(cuda:0 … cuda:{cuda_count - 1})")
        return spec
    if local_rank >= cuda_count:
        raise DeviceError(f"rank {local_rank} of this node has no GPU: {cuda_count} visible for {world_size} "
                          f"processes; start torchrun with --nproc_per_node {cuda_count} or fewer, or pass --device "
                          f"cpu (gloo)")
    return f"cuda:{local_rank}"


def default_num_workers(device_type: str, cores: int, local_world_size: int = 1) -> int:
    """DataLoader workers for ``num_workers=None``: on CUDA, this process's share of the node's cores
    less one (at most 8), so decoding keeps up with the GPU; on CPU 0, as workers would take cores
    from the model itself (and the prepared-image cache leaves them little to do)."""
    if device_type != "cuda":
        return 0
    return max(0, min(8, cores // max(local_world_size, 1) - 1))


def resolve_num_workers(num_workers: int | None, device: torch.device, world_size: int = 1) -> int:
    """An explicit worker count as given; ``None`` by :func:`default_num_workers` on this machine."""
    if num_workers is not None:
        return num_workers
    return default_num_workers(device.type, available_cores(), world_size)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding workers of the embedding pipeline and the prepared-image build: one per core, at
    most 8, none on single-core machines."""
    cores = available_cores()
    return 0 if cores <= 1 else min(8, cores)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """:func:`device_for` on this machine, for this process's ``LOCAL_RANK``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return torch.device(device_for(str(spec) if spec else None, int(os.environ.get("LOCAL_RANK", 0)), count, world))


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` on CUDA, ``"fp32"`` elsewhere; explicit values are kept."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` in bf16 for ``"bf16"``, a no-op context for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_dtype(device: torch.device, precision: str | None = "auto") -> torch.dtype:
    """Weights' dtype for pure inference: bf16 for precision "bf16" (auto: on CUDA), else fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
