"""Contrastive pretraining: its validation metric and the captioned-folder source."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mora_retrieval.errors import DataError


def test_caption_retrieval_recall_against_brute_force():
    from mora_retrieval.tasks.pretrain import caption_retrieval_recall

    torch.manual_seed(0)
    ids = ["a", "a", "b", "c", "c", "c", "d"]
    image = torch.randn(len(ids), 8)
    text = torch.randn(len(ids), 8)
    got = caption_retrieval_recall(image, text, ids)
    gallery = {i: image[ids.index(i)] for i in dict.fromkeys(ids)}
    names = list(gallery)
    t2i = sum(names[max(range(len(names)), key=lambda j: float(text[c] @ gallery[names[j]]))] == ids[c]
              for c in range(len(ids))) / len(ids)
    i2t = sum(ids[max(range(len(ids)), key=lambda c: float(text[c] @ gallery[n]))] == n for n in names) / len(names)
    assert got["t2i_recall@1"] == pytest.approx(100 * t2i)
    assert got["i2t_recall@1"] == pytest.approx(100 * i2t)


def test_image_caption_folder(tmp_path):
    from mora_retrieval.data.folder import ImageCaptionFolder

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "sub" / "x.png")
    (tmp_path / "sub" / "x.txt").write_text("a red square\n\na small red square\n")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "y.jpg")  # no caption: not a pair
    data = ImageCaptionFolder(tmp_path)
    assert [(item["caption"], item["image_id"]) for item in (data[0], data[1])] == [
        ("a red square", "sub/x.png"), ("a small red square", "sub/x.png")]
    assert len(data) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image with a sidecar caption"):
        ImageCaptionFolder(tmp_path / "empty")
