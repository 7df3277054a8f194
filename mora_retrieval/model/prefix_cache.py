"""Cache the outputs of a tower's frozen leading blocks across epochs (adapters in the last blocks).

When only the last blocks of a tower are trainable and the inputs are deterministic (no random
augmentation, no dropout in the frozen part), the hidden state entering the first trainable
block is the same every epoch. :class:`FrozenPrefixCache` stores it per sample key (an image
name, a caption index) and, on later epochs, runs only the trainable suffix of the tower.

Both directions use open_clip's own forward code: the prefix is run by the tower itself and
stopped by a hook after the last frozen block; the suffix is run by the tower with its blocks
temporarily cut to the trainable ones and a pre-hook that swaps the transformer's input for the
cached states. Only the transformer blocks are skipped; the stem (patch or token embedding) is
recomputed, which is cheap.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch import nn


class _StopAfterPrefix(Exception):
    pass


def frozen_prefix_depth(transformer: nn.Module) -> int:
    """How many leading blocks of ``transformer`` have no trainable parameter."""
    depth = 0
    for block in transformer.resblocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def _to_nld(transformer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if getattr(transformer, "batch_first", True) else x.transpose(0, 1)


@torch.no_grad()
def run_prefix(tower: Callable[[], torch.Tensor], transformer: nn.Module, depth: int) -> torch.Tensor:
    """The hidden states ``[N, L, D]`` after block ``depth - 1``, computed by ``tower()`` itself."""
    captured: dict[str, torch.Tensor] = {}

    def stop(module, args, output):
        captured["x"] = _to_nld(transformer, output)
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


class FrozenPrefixCache:
    """Per-key hidden states of one tower's frozen prefix, kept on ``storage`` (in ``dtype`` if given)."""

    def __init__(self, transformer: nn.Module, storage: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.transformer = transformer
        self.depth = frozen_prefix_depth(transformer)
        self.storage = torch.device(storage)
        self.dtype = dtype
        self.states: dict[Hashable, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def active(self) -> bool:
        return self.depth > 0

    def encode(self, tower: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
               keys: Sequence[Hashable]) -> torch.Tensor:
        """``tower(inputs)`` with the frozen prefix read from (or added to) the cache."""
        if not self.active:
            return tower(inputs)
        missing = [i for i, key in enumerate(keys) if key not in self.states]
        if missing:
            index = torch.tensor(missing, device=inputs.device)
            fresh = run_prefix(lambda: tower(inputs[index]), self.transformer, self.depth)
            for row, i in enumerate(missing):
                self.states[keys[i]] = fresh[row].to(self.storage, self.dtype or fresh.dtype)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        hidden = torch.stack([self.states[key] for key in keys]).to(inputs.device, non_blocking=True)
        with start_after_prefix(self.transformer, self.depth, hidden):
            return tower(inputs)
