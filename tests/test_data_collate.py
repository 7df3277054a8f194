"""Batching: skipped items dropped, captions tokenised in the collate function."""

from __future__ import annotations

import torch
from PIL import Image

from mora_retrieval.data.collate import CaptionCollate, collate_skip_none
from mora_retrieval.data.folder import ImageCaptionFolder
from mora_retrieval.data.images import make_transform
from mora_retrieval.engine import TrainConfig, Trainer, TrainModule
from mora_retrieval.engine.sampling import ResumableSampler
from mora_retrieval.model.encode import collect, ordered_loader


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


def _caption_folder(root, bad: set[int], n: int = 8):
    """``n`` coloured images with sidecar captions; those at ``bad`` (sorted order) are not images."""
    root.mkdir()
    for i in range(n):
        path = root / f"{i:02d}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG but broken")
        else:
            Image.new("RGB", (10, 10), (30 * i, 0, 0)).save(path)
        path.with_suffix(".txt").write_text(f"picture {i}\n")
    return ImageCaptionFolder(root, make_transform("clip", 8), skip_bad_images=True)


class _Brightness(TrainModule):
    """Regress a caption's token count from mean pixel values: just enough to train on the folder."""

    main_metric = "seen"

    def __init__(self, val_set, tokenizer):
        super().__init__()
        self.head = torch.nn.Linear(3, 1)
        self.val_set, self.tokenizer = val_set, tokenizer

    def forward(self, batch):
        pred = self.head(batch["image"].mean(dim=(2, 3)))
        return torch.nn.functional.mse_loss(pred.squeeze(1), batch["tokens"].float().sum(dim=1))

    def evaluate(self, device):
        out = collect(ordered_loader(self.val_set, 2, device, collate_fn=CaptionCollate(self.tokenizer)),
                      lambda batch: {"ids": list(batch["image_id"])}, device)
        return {"seen": float(len(out["ids"]))}


def test_batches_of_only_bad_images_are_skipped_in_training_and_evaluation(tmp_path):
    """--skip-bad-images semantics end to end: a folder whose bad images fill whole batches trains and validates."""
    bad = {1, 2, 3, 5}
    data = _caption_folder(tmp_path / "images", bad)
    tokenizer = lambda texts: torch.tensor([[len(t)] for t in texts])  # noqa: E731
    # evaluation in order, batch 2: batch [2, 3] is empty and passed over, the others lose their bad items
    out = collect(ordered_loader(data, 2, torch.device("cpu"), collate_fn=CaptionCollate(tokenizer)),
                  lambda batch: {"ids": list(batch["image_id"])}, torch.device("cpu"))
    assert out["ids"] == ["00.png", "04.png", "06.png", "07.png"]
    assert data.bad_images.count == 4

    config = TrainConfig(epochs=2, batch_size=2, lr=0.01, seed=3, device="cpu", num_workers=0)
    module = _Brightness(data, tokenizer)
    result = Trainer(module, config, tmp_path / "run", data, CaptionCollate(tokenizer), quiet=True).fit()
    sampler = ResumableSampler(len(data), 2, config.seed)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        expected.append(sum(order[k] in bad and order[k + 1] in bad for k in range(0, len(order), 2)))
    assert [r["empty_batches"] for r in result.history] == expected and sum(expected) > 0
    assert [r["val"]["seen"] for r in result.history] == [4.0, 4.0]
    assert all(torch.isfinite(p).all() for p in module.parameters())
