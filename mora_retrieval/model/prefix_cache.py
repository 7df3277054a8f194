"""Cache the outputs of a tower's frozen leading blocks across epochs (adapters in the last blocks).

When only the last blocks of a tower are trainable and the inputs are deterministic (no random
augmentation, no dropout in the frozen part), the hidden state entering the first trainable
block is the same every epoch. :class:`FrozenPrefixCache` stores it per sample row (an image's
row in the prepared gallery, a caption's triplet index) in one dense tensor and, on later
epochs, runs only the trainable suffix of the tower.

Both directions run open_clip's own forward code (:func:`run_prefix`, :func:`start_after_prefix`).
Only the transformer blocks are skipped; the stem (patch or token embedding) is recomputed, which is cheap.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class _StopAfterPrefix(Exception):
    pass


def frozen_prefix_depth(transformer: nn.Module) -> int:
    """How many leading blocks of ``transformer`` have no trainable parameter."""
    trainable = (i for i, block in enumerate(transformer.resblocks) if any(p.requires_grad for p in block.parameters()))
    return next(trainable, len(transformer.resblocks))


@torch.no_grad()
def run_prefix(tower: Callable[[], torch.Tensor], transformer: nn.Module, depth: int) -> torch.Tensor:
    """The hidden states ``[N, L, D]`` after block ``depth - 1``, computed by ``tower()`` itself."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module, args, output):
        captured["x"] = output if getattr(transformer, "batch_first", True) else output.transpose(0, 1)
        raise _StopAfterPrefix

    handle = transformer.resblocks[depth - 1].register_forward_hook(stop)
    try:
        tower()
    except _StopAfterPrefix:
        pass
    finally:
        handle.remove()
    return captured["x"]


@contextlib.contextmanager
def start_after_prefix(transformer: nn.Module, depth: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``transformer`` skips its first ``depth`` blocks and starts from ``hidden``."""
    blocks = transformer.resblocks

    def swap_input(module, args, kwargs):
        return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs

    handle = transformer.register_forward_pre_hook(swap_input, with_kwargs=True)
    transformer.resblocks = blocks[depth:]
    try:
        yield
    finally:
        transformer.resblocks = blocks
        handle.remove()


#: Share of the free device memory a cache may take before it is kept in pinned host memory instead.
DEVICE_BUDGET_SHARE = 0.5


def cache_placement(nbytes: int, device_type: str, free_device_bytes: int | None) -> str:
    """Where a cache of ``nbytes`` lives: ``"device"`` (CUDA, within :data:`DEVICE_BUDGET_SHARE` of
    the free memory), ``"pinned"`` (CUDA, too large: page-locked host memory, copied per batch) or
    ``"cpu"`` (training on the CPU)."""
    if device_type != "cuda":
        return "cpu"
    if free_device_bytes is not None and nbytes <= DEVICE_BUDGET_SHARE * free_device_bytes:
        return "device"
    return "pinned"


def cache_dtype(device_type: str, computed: torch.dtype) -> torch.dtype:
    """bf16 on CUDA (half the memory, what autocast computes anyway); on the CPU the computed
    dtype, so that a cached step equals an uncached one exactly."""
    return torch.bfloat16 if device_type == "cuda" else computed


class FrozenPrefixCache:
    """Hidden states of one tower's frozen prefix for ``rows`` samples: one ``[rows, L, D]`` tensor,
    allocated at the first fill in :func:`cache_dtype` and placed by :func:`cache_placement`
    (``memory_budget`` stands in for the free device memory); ``filled`` (CPU bool) marks its rows."""

    def __init__(self, transformer: nn.Module, rows: int, device: str | torch.device = "cpu",
                 memory_budget: int | None = None):
        self.transformer = transformer
        self.depth = frozen_prefix_depth(transformer)
        self.rows = int(rows)
        self.device = torch.device(device)
        self.memory_budget = memory_budget
        self.filled = torch.zeros(self.rows, dtype=torch.bool)
        self.states: torch.Tensor | None = None
        self.placement: str | None = None
        self.hits = 0
        self.misses = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    def covers(self, rows: torch.Tensor) -> bool:
        """Whether every row of ``rows`` (a CPU index tensor) holds its states."""
        return bool(self.filled[rows].all())

    def _allocate(self, fresh: torch.Tensor) -> None:
        dtype = cache_dtype(self.device.type, fresh.dtype)
        nbytes = self.rows * fresh[0].numel() * dtype.itemsize
        free = self.memory_budget
        if free is None and self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        self.placement = cache_placement(nbytes, self.device.type, free)
        self.states = torch.empty((self.rows, *fresh.shape[1:]), dtype=dtype, pin_memory=self.placement == "pinned",
                                  device=self.device if self.placement == "device" else "cpu")

    def gather(self, rows_cpu: torch.Tensor) -> torch.Tensor:
        """The states of ``rows_cpu``. From pinned host memory the rows are gathered into a fresh
        page-locked buffer (torch's caching host allocator reuses it once its copy is done), so
        the copy to the device that follows is truly asynchronous."""
        if self.placement != "pinned":
            return self.states[rows_cpu.to(self.states.device)]
        out = torch.empty((len(rows_cpu), *self.states.shape[1:]), dtype=self.states.dtype, pin_memory=True)
        return torch.index_select(self.states, 0, rows_cpu, out=out)

    def encode(self, tower: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
        """``tower(inputs)`` with the frozen prefix of sample rows ``rows`` (int64) read from (or
        added to) the cache. Rows already filled need no real ``inputs`` (the stem's result on
        them is discarded): zeros of the right shape will do."""
        if not self.active:
            return tower(inputs)
        rows_cpu = rows.to("cpu", torch.int64)
        missing = (~self.filled[rows_cpu]).nonzero().squeeze(1)
        if len(missing):
            fresh = run_prefix(lambda: tower(inputs[missing.to(inputs.device)]), self.transformer, self.depth)
            if self.states is None:
                self._allocate(fresh)
            self.states[rows_cpu[missing].to(self.states.device)] = fresh.to(self.states.device, self.states.dtype)
            self.filled[rows_cpu[missing]] = True
        self.misses += len(missing)
        self.hits += len(rows_cpu) - len(missing)
        hidden = self.gather(rows_cpu).to(inputs.device, non_blocking=True)
        with start_after_prefix(self.transformer, self.depth, hidden):
            return tower(inputs)
