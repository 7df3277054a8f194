"""The classification head: its initialisation, the classifier's features, and the head file."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mora_retrieval.errors import TrainingError
from mora_retrieval.fileio import save_tensors
from mora_retrieval.model.heads import CLIPClassifier, LinearHead, load_head, save_head


def test_head_init_is_normal_002_with_zero_bias():
    torch.manual_seed(0)
    head = LinearHead(1024, 101)
    w = head.linear.weight.detach()
    assert w.shape == (101, 1024)
    assert float(w.mean()).__abs__() < 1e-3 and float(w.std()) == pytest.approx(0.02, rel=0.03)
    assert torch.count_nonzero(head.linear.bias) == 0


def test_features_are_the_concatenated_tower_embeddings(tiny_model):
    model, _, tokenizer = tiny_model
    image, tokens = torch.randn(3, 3, 32, 32), tokenizer(["a red disc", "", "two squares"])
    with torch.no_grad():
        img, txt = model.encode_image(image), model.encode_text(tokens)
        normalized = CLIPClassifier(model, LinearHead(128, 2)).features(image, tokens)
        raw = CLIPClassifier(model, LinearHead(128, 2), features="raw").features(image, tokens)
    assert torch.allclose(normalized, torch.cat([F.normalize(img, dim=-1), F.normalize(txt, dim=-1)], 1), atol=1e-6)
    assert torch.allclose(raw, torch.cat([img, txt], 1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown feature mode"):
        CLIPClassifier(model, LinearHead(128, 2), features="scaled")


def test_head_file_round_trip_and_errors(tmp_path):
    head = LinearHead(8, 3)
    path = save_head(head, tmp_path / "head.safetensors", "multiclass", ["a", "b", "c"], "raw")
    loaded, meta = load_head(path)
    assert torch.equal(loaded.linear.weight, head.linear.weight) and torch.equal(loaded.linear.bias, head.linear.bias)
    assert meta == {"task": "multiclass", "features": "raw", "class_names": ["a", "b", "c"]}
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(TrainingError, match="bad.safetensors"):
        load_head(tmp_path / "bad.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(TrainingError, match="other.safetensors: not a classifier head"):
        load_head(tmp_path / "other.safetensors")
