"""Run a tower's frozen leading blocks in pure bf16 (stage-1 training under bf16 precision).

Under autocast, frozen fp32 blocks still pay for LayerNorms in fp32 and a cast of every weight
at every linear; a bf16 copy of those blocks run with autocast *disabled* avoids both (on an
H100 the stage-1 step of ViT-B-16 was about 1.1x faster that way, see BENCHMARKS.md).

:class:`Bf16Prefix` casts that copy once, when first used, on the device of the fp32 blocks, and
keeps it *outside* the module tree: the frozen fp32 weights stay in place untouched, so state-dict
keys, merging and the exported checkpoint are unchanged, and the copy takes no part in ``.to()``,
``state_dict()`` or the optimiser. Inside :meth:`Bf16Prefix.active` the transformer's block list
is, for one forward, the bf16 prefix followed by the adapted blocks, which keep their fp32 master
weights under the caller's autocast.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from .prefix_cache import frozen_prefix_depth


class _Bf16Blocks(nn.Module):
    """The bf16 prefix as one block: bf16 in, autocast off, float32 out."""

    def __init__(self, blocks: list[nn.Module], weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.weight_dtype = weight_dtype

    def get_weight_dtype(self) -> torch.dtype:
        """The fp32 blocks' dtype: open_clip casts the tower's input to ``resblocks[0]``'s, which
        must not change (the prefix casts to bf16 itself)."""
        return self.weight_dtype

    def forward(self, x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
        mask = None if attn_mask is None else attn_mask.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        with torch.autocast(x.device.type, enabled=False):
            for block in self.blocks:
                x = block(x, attn_mask=mask)
        return x.to(out_dtype)


class Bf16Prefix:
    """A pure-bf16 copy of ``transformer``'s frozen leading blocks (see the module docstring)."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.depth = frozen_prefix_depth(transformer)
        self._copy: _Bf16Blocks | None = None

    @property
    def usable(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, the transformer runs its frozen prefix from the bf16 copy."""
        if not self.usable:
            yield
            return
        blocks = self.transformer.resblocks
        if self._copy is None:
            bf16 = [copy.deepcopy(block).to(torch.bfloat16).requires_grad_(False) for block in blocks[:self.depth]]
            self._copy = _Bf16Blocks(bf16, next(blocks[0].parameters()).dtype).eval()
        self.transformer._modules["resblocks"] = nn.ModuleList([self._copy, *blocks[self.depth:]])
        try:
            yield
        finally:
            self.transformer._modules["resblocks"] = blocks
