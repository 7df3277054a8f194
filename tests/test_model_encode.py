"""Feature extraction: the batched loop against one forward over everything, and the composed query."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mora_retrieval.errors import MoraError
from mora_retrieval.fileio import save_tensors
from mora_retrieval.model.combiner import Combiner, load_combiner, save_combiner
from mora_retrieval.model.encode import collect, composed_query, encode_image_batch, encode_images, encode_texts

CPU = torch.device("cpu")


class _Images(Dataset):
    """Items ``{"image", "name"}``; item 2 is a skipped bad image (None)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return None if i == 2 else {"image": self.images[i], "name": f"img{i}"}


def test_batched_image_and_text_features_equal_one_forward(tiny_model):
    model, _, tokenizer = tiny_model
    torch.manual_seed(0)
    images = torch.randn(7, 3, 32, 32)
    feats, names = encode_images(model, _Images(images), CPU, batch_size=3)
    kept = [0, 1, 3, 4, 5, 6]
    with torch.no_grad():
        want = model.encode_image(images[kept])
    assert names == [f"img{i}" for i in kept]
    assert torch.allclose(feats, want, atol=1e-5) and feats.dtype == torch.float32
    unit, _ = encode_images(model, _Images(images), CPU, batch_size=4, normalize=True)
    assert torch.allclose(unit, F.normalize(want, dim=-1), atol=1e-5)
    assert torch.allclose(encode_image_batch(model, images[kept], CPU), want, atol=1e-5)

    texts = [f"a {c} shape" for c in ("red", "blue", "green", "white", "black")]
    with torch.no_grad():
        want_text = model.encode_text(tokenizer(texts))
    assert torch.allclose(encode_texts(model, tokenizer, texts, CPU, batch_size=2), want_text, atol=1e-5)


def test_collect_joins_tensors_and_lists_and_skips_empty_batches():
    seen = []
    batches = [{"x": torch.tensor([1, 2])}, None, {"x": torch.tensor([3])}]
    out = collect(batches, lambda b: {"y": b["x"] * 10, "ids": b["x"].tolist()}, CPU, progress=seen.append)
    assert out["y"].tolist() == [10, 20, 30] and out["ids"] == [1, 2, 3] and seen == [2, 1]
    assert collect([None], lambda b: {}, CPU) == {}


def test_composed_query_is_the_normalised_sum_or_the_combiner():
    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(composed_query(image, text), F.normalize(image + text, dim=-1))
    one = text[:1]  # one text for every image
    assert torch.allclose(composed_query(image, one), F.normalize(image + one, dim=-1))
    combiner = Combiner(8).eval()
    with torch.no_grad():
        assert torch.allclose(composed_query(image, one, combiner), combiner(image, one.expand(4, -1)))
        assert composed_query(image, text, combiner).norm(dim=-1) == pytest.approx([1.0] * 4, abs=1e-5)


def test_combiner_file_round_trip_and_errors(tmp_path):
    combiner = Combiner(8, proj_dim=12, hidden_dim=20).eval()
    save_combiner(combiner, tmp_path / "combiner.safetensors")
    loaded = load_combiner(tmp_path / "combiner.safetensors")
    assert loaded.sizes() == {"dim": 8, "proj_dim": 12, "hidden_dim": 20} and not loaded.training
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(image, text), combiner(image, text))
    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(MoraError, match="other.safetensors: not a Combiner file"):
        load_combiner(tmp_path / "other.safetensors")
    with pytest.raises(MoraError, match="missing.safetensors: Combiner file not found"):
        load_combiner(tmp_path / "missing.safetensors")
