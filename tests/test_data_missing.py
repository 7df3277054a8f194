"""The missing-modality protocol: specs, exact counts, reproducibility, storage and the wrapper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mora_retrieval.data.images import make_transform
from mora_retrieval.data.missing import MissingSpec, WithMissingModality, assign_missing, stored_missing_codes
from mora_retrieval.errors import DataError


@pytest.mark.parametrize("text,kind,ratio,share", [
    ("none", "none", 0.0, 0.5), ("text:0.5", "text", 0.5, 0.5), ("image:0.3", "image", 0.3, 0.5),
    ("both:0.7", "both", 0.7, 0.5), ("both:0.7:0.3", "both", 0.7, 0.3)])
def test_parse_and_str_round_trip(text, kind, ratio, share):
    spec = MissingSpec.parse(text, seed=4)
    assert (spec.kind, spec.ratio, spec.both_image_share, spec.seed) == (kind, ratio, share, 4)
    assert str(spec) == text and MissingSpec.parse(str(spec), seed=4) == spec


@pytest.mark.parametrize("bad", ["", "text", "none:0.2", "text:1.5", "image:0.3:0.2", "both:x", "all:0.5"])
def test_parse_rejects(bad):
    with pytest.raises(DataError, match="missing-modality"):
        MissingSpec.parse(bad)


@pytest.mark.parametrize("n,spec,complete,text,image", [
    (100, MissingSpec("none"), 100, 0, 0),
    (100, MissingSpec("text", 0.7), 30, 70, 0),
    (101, MissingSpec("image", 0.3), 71, 0, 30),      # round(30.3) = 30
    (100, MissingSpec("both", 0.7), 30, 35, 35),
    (10, MissingSpec("both", 0.7, 0.3), 3, 5, 2),     # 7 missing, round(2.1) = 2 of them images
    (9, MissingSpec("both", 0.5), 5, 2, 2),           # round(4.5) = 4 (round half to even), then 2 / 2
])
def test_exact_counts(n, spec, complete, text, image):
    codes = assign_missing(n, spec)
    assert codes.dtype == np.int8 and codes.shape == (n,)
    assert [(codes == c).sum() for c in (0, 1, 2)] == [complete, text, image]


def test_reproducible_and_seeded():
    spec = MissingSpec("both", 0.6, seed=3)
    a, b = assign_missing(500, spec), assign_missing(500, spec)
    assert np.array_equal(a, b)
    other = assign_missing(500, MissingSpec("both", 0.6, seed=4))
    assert not np.array_equal(a, other)
    # same seed: the text-missing set for 0.3 is a subset of that for 0.6 (one permutation, prefixes)
    low = assign_missing(500, MissingSpec("text", 0.3, seed=3)) == 1
    high = assign_missing(500, MissingSpec("text", 0.6, seed=3)) == 1
    assert (low & ~high).sum() == 0


def test_assignments_stored_and_reused(tmp_path):
    store = tmp_path / "missing"
    spec = MissingSpec.parse("both:0.7", seed=1)
    codes = stored_missing_codes(store, "food101", "train", 50, spec)
    files = list((tmp_path / "missing").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["codes"] == codes.tolist() and data["n"] == 50 and data["spec"] == "both:0.7"
    assert data["counts"] == {"complete": 15, "text_missing": 17, "image_missing": 18}  # round(17.5) = 18
    # reuse: the stored codes win even if the file was edited by hand
    data["codes"][0] = 2 if data["codes"][0] != 2 else 0
    files[0].write_text(json.dumps(data))
    again = stored_missing_codes(store, "food101", "train", 50, spec)
    assert again[0] == data["codes"][0] and again[0] != codes[0]
    # other keys get their own files
    stored_missing_codes(store, "food101", "test", 20, spec)
    stored_missing_codes(store, "food101", "train", 50, MissingSpec.parse("both:0.7:0.3", seed=1))
    stored_missing_codes(store, "food101", "train", 50, MissingSpec.parse("both:0.7", seed=2))
    assert len(list((tmp_path / "missing").glob("*.json"))) == 4
    with pytest.raises(DataError, match="stored for 50 samples but food101/train has 51"):
        stored_missing_codes(store, "food101", "train", 51, spec)


class _Toy(torch.utils.data.Dataset):
    """A dataset of coloured rectangles with texts, through a real transform."""

    def __init__(self, n: int = 6, key: str = "text") -> None:
        self.transform = make_transform("clip", 8)
        self.n, self.key = n, key

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == 5:
            return None  # a skipped bad image
        img = Image.new("RGB", (12, 9), (40 * i, 20, 200))
        return {"image": self.transform(img), self.key: f"text {i}", "label": torch.tensor(i)}


def test_wrapper_applies_codes():
    base = _Toy()
    codes = np.array([0, 1, 2, 0, 2, 1], dtype=np.int8)
    ds = WithMissingModality(base, codes, "ones")
    assert ds[0]["text"] == "text 0" and ds[0]["missing"] == 0 and torch.equal(ds[0]["image"], base[0]["image"])
    assert ds[1]["text"] == "" and ds[1]["missing"] == 1 and torch.equal(ds[1]["image"], base[1]["image"])
    assert ds[2]["text"] == "text 2" and torch.equal(ds[2]["image"], torch.ones(3, 8, 8)) and ds[2]["missing"] == 2
    assert ds[5] is None and int(ds[4]["label"]) == 4
    white = WithMissingModality(base, codes, "white")[2]["image"]
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(white, ((1 - mean) / std)[:, None, None].expand(3, 8, 8), atol=1e-5)
    captions = WithMissingModality(_Toy(key="caption"), codes)
    assert captions[1]["caption"] == ""


def test_wrapper_errors():
    with pytest.raises(DataError, match="cover 3 samples but the dataset has 6"):
        WithMissingModality(_Toy(), np.zeros(3, dtype=np.int8))
    with pytest.raises(DataError, match="unknown missing-image fill 'black'"):
        WithMissingModality(_Toy(), np.zeros(6, dtype=np.int8), "black")
    toy = _Toy()
    toy.transform = None
    pil = type("Pil", (), {"__len__": lambda s: 1, "__getitem__": lambda s, i: {"image": Image.new("RGB", (4, 4)),
                                                                                  "text": "t"}})()
    with pytest.raises(DataError, match="transform returns tensors"):
        WithMissingModality(pil, np.array([2], dtype=np.int8))[0]


def test_image_missing_samples_are_not_decoded_once_the_shape_is_known(tmp_path, monkeypatch):
    """Their image is replaced anyway: after one real image, no decode happens for them."""
    from mora_retrieval.data.base import ImageDataset
    from mora_retrieval.data.missing import IMAGE_MISSING
    from mora_retrieval.data.registry import get_classification_dataset
    from mora_retrieval.data.shapes import generate_shapes_world

    world = generate_shapes_world(tmp_path / "w", size="tiny")
    data = get_classification_dataset("hateful-memes", world["hateful_memes"], "val", transform=make_transform("clip", 32))
    codes = np.zeros(len(data), dtype=np.int8)
    codes[1::2] = IMAGE_MISSING
    wrapped = WithMissingModality(data, codes)
    reads = []
    original = ImageDataset._image
    monkeypatch.setattr(ImageDataset, "_image", lambda self, path, data=None: reads.append(path) or original(self, path, data))
    items = [wrapped[i] for i in range(len(data))]
    assert len(reads) == int((codes == 0).sum())  # only complete samples were decoded
    for item, code in zip(items, codes):
        assert item["missing"] == code
        if code == IMAGE_MISSING:
            assert torch.equal(item["image"], torch.ones(3, 32, 32))
        else:
            assert not torch.equal(item["image"], torch.ones(3, 32, 32))
