"""Contrastive pretraining: its validation metric, the captioned-folder source, a run without validation."""

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


def test_pretraining_without_validation_exports_the_last_weights(tmp_path):
    """No validation set: no epoch is "best", so the last epoch's weights are exported."""
    import open_clip
    from safetensors.torch import load_file

    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.engine.checkpoint import load_checkpoint
    from mora_retrieval.tasks.pretrain import PretrainSettings, build_settings, pretrain

    for i, colour in enumerate(["red", "blue", "green", "white", "black", "yellow"]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {colour} square")
    settings = PretrainSettings(run_dir=str(tmp_path / "run"), folder=str(tmp_path),
                                train=TrainConfig(epochs=1, batch_size=2, device="cpu", num_workers=0))
    with pytest.warns(UserWarning, match="randomly initialised"):
        summary = pretrain(settings, quiet=True)
    assert summary["best_epoch"] is None and summary["pairs"] == 6
    exported = load_file(summary["checkpoint"])
    assert set(exported) == set(open_clip.create_model("mora-tiny").state_dict())
    last = load_checkpoint(tmp_path / "run" / "train" / "checkpoints" / "last.pt")["trainable"]
    assert all(torch.equal(tensor, last[f"model.{name}"]) for name, tensor in exported.items())
    # the record round-trips through the settings layers: a resume rebuilds the same settings
    again = build_settings(settings.run_dir, overrides={"folder": str(tmp_path), "train": settings.train.to_dict()})
    assert again.to_dict() == settings.to_dict()
