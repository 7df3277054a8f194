"""Contrastive pretraining, the captioned-folder reader, and the demo at its smallest size."""

from __future__ import annotations

import json

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


def test_demo_verdict_states_each_comparison_exactly():
    from mora_retrieval.demo import cir_verdict

    cir = {"mora": {"val_stage1": {"avg": 44.0}, "val_combiner": {"avg": 63.5}},
           "lora": {"val_stage1": {"avg": 43.5}, "val_combiner": {"avg": 63.5}},
           "full": {"val_stage1": {"avg": 46.25}, "val_combiner": {"avg": 66.0}}}
    text = cir_verdict(cir, 1e-4)
    assert "summed features: MoRA 44.00 is higher than LoRA (same rank, same budget) 43.50" in text
    assert "Combiner: MoRA 63.50 is equal to LoRA (same rank, same budget) 63.50" in text
    assert "summed features: MoRA 44.00 is lower than full fine-tuning (lr 0.0001) 46.25" in text
    assert "Combiner: MoRA 63.50 is lower than full fine-tuning (lr 0.0001) 66.00" in text
    assert "beats" not in text


def test_demo_smallest_size_end_to_end(tmp_path):
    import open_clip

    from mora_retrieval.demo import DemoSettings, run_demo

    settings = DemoSettings.smoke(str(tmp_path / "demo"))
    summary = run_demo(settings, quiet=True)
    out = tmp_path / "demo"
    report = (out / "report.html").read_text()
    for heading in ("CIRR-format validation", "image-to-image retrieval", "Missing-modality classification",
                    "Training curves", "A composed search", "chance", "Embedding analysis", "Inter-modal distance"):
        assert heading in report
    data = json.loads((out / "results.json").read_text())
    analysis = json.loads((out / "runs" / "classify-food101" / "analysis" / "analysis.json").read_text())
    assert data["analysis"].endswith("analysis.json") and analysis["pretrained"].endswith("pretrained.safetensors")
    assert analysis["drift"]["vision"]["l2"] > 0 and analysis["spectra"]["available"]
    for row in list(data["cirr_val"].values()) + list(data["coco_i2i"].values()):
        assert all(0.0 <= v <= 100.0 for v in row.values())
    assert set(data["cirr_val"]) == {f"{m}, {s}" for m in ("CLIP4CIR (full)", "CLIP4CIR + LoRA", "CLIP4CIR + MoRA")
                                     for s in ("summed features", "Combiner")}
    assert len(data["search"]["hits"]) == 8
    # Chance of the CIRR subset metric is K/5; the COCO chance is a probability per query.
    assert data["cirr_chance"]["recall_subset@1"] == pytest.approx(20.0)
    assert 0.0 < data["coco_chance"]["R@1"] < data["coco_chance"]["R@5"] < data["coco_chance"]["R@10"] <= 100.0
    # The pretrained checkpoint is a plain open_clip checkpoint, reused by a second run.
    open_clip.create_model("mora-tiny", pretrained=str(out / "pretrain" / "pretrained.safetensors"))
    stamp = (out / "pretrain" / "pretrained.safetensors").stat().st_mtime_ns
    from mora_retrieval.demo import _pretrain, _world

    world = _world(settings, None)
    _pretrain(settings, world, None, quiet=True)
    assert (out / "pretrain" / "pretrained.safetensors").stat().st_mtime_ns == stamp
    assert summary["report"] == str(out / "report.html")
