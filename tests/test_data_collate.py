"""Batching: skipped items dropped, captions tokenised in the collate function."""

from __future__ import annotations

import torch

from mora_retrieval.data.collate import CaptionCollate, collate_skip_none


def test_collate_skip_none():
    batch = [{"x": torch.tensor(1)}, None, {"x": torch.tensor(3)}]
    out = collate_skip_none(batch)
    assert out["x"].tolist() == [1, 3]
    assert collate_skip_none([None, None]) is None


def test_caption_collate_tokenises_the_kept_captions():
    seen = []

    def tokenizer(texts):
        seen.append(texts)
        return torch.tensor([[len(t)] for t in texts])

    collate = CaptionCollate(tokenizer)
    out = collate([{"caption": "a red disc", "x": torch.tensor(1)}, None, {"caption": "ab", "x": torch.tensor(2)}])
    assert seen == [["a red disc", "ab"]]
    assert out["tokens"].tolist() == [[10], [2]] and out["x"].tolist() == [1, 2]
    assert collate([None]) is None
    assert "tokens" not in collate([{"x": torch.tensor(0)}])  # no caption field: nothing to tokenise
