"""Batching dict items: drop the ``None`` items of skipped bad images, tokenise captions."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.utils.data import default_collate


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` after dropping the ``None`` items of skipped bad images; an all-``None`` batch
    is ``None``, which :class:`~mora_retrieval.engine.Trainer` and :func:`~mora_retrieval.model.encode.collect`
    pass over."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


class CaptionCollate:
    """Collate dict items and tokenise their ``caption`` field (runs in DataLoader workers)."""

    def __init__(self, tokenizer: Callable, field: str = "caption"):
        self.tokenizer = tokenizer
        self.field = field

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        batch = collate_skip_none(items)
        if batch is not None and self.field in batch:
            batch["tokens"] = self.tokenizer(list(batch[self.field]))
        return batch
