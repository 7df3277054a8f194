"""Each loader against a small hand-written fixture in the published layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mora_retrieval.data.cirr import CIRRGallery, CIRRTriplets
from mora_retrieval.data.coco import COCOCaptions, COCOImages
from mora_retrieval.data.food101 import Food101
from mora_retrieval.data.hateful_memes import HatefulMemes
from mora_retrieval.data.collate import collate_skip_none
from mora_retrieval.data.images import make_transform
from mora_retrieval.data.mmimdb import MMIMDB_GENRES, MMIMDb
from mora_retrieval.data.registry import get_classification_dataset
from mora_retrieval.errors import DataError

COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


def _img(path: Path, colour_index: int = 0, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", size, COLOURS[colour_index % len(COLOURS)]).save(path, format=fmt)


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------- CIRR


def _cirr(root: Path) -> Path:
    names = {"train": ["train-1-0-img0", "train-1-0-img1", "train-7-1-img0"],
             "val": ["dev-1-0-img0", "dev-1-0-img1"], "test1": ["test1-3-0-img0", "test1-3-0-img1"]}
    for split, ns in names.items():
        mapping = {}
        for i, n in enumerate(ns):
            rel = f"./train/{i}/{n}.png" if split == "train" else f"./{'dev' if split == 'val' else 'test1'}/{n}.png"
            _img(root / rel, i)
            mapping[n] = rel
        _json(root / "image_splits" / f"split.rc2.{split}.json", mapping)
    members = ["train-1-0-img0", "train-1-0-img1", "train-7-1-img0", "a", "b", "c"]
    _json(root / "captions" / "cap.rc2.train.json", [
        {"pairid": 12, "reference": "train-1-0-img0", "target_hard": "train-1-0-img1",
         "target_soft": {"train-1-0-img1": 1.0}, "caption": "make it green",
         "img_set": {"id": 1, "members": members, "reference_rank": 0, "target_rank": 1}},
        {"pairid": 13, "reference": "train-7-1-img0", "target_hard": "train-1-0-img0",
         "target_soft": {}, "caption": "make it red",
         "img_set": {"id": 1, "members": members, "reference_rank": 2, "target_rank": 0}},
    ])
    _json(root / "captions" / "cap.rc2.val.json", [
        {"pairid": 0, "reference": "dev-1-0-img0", "target_hard": "dev-1-0-img1", "target_soft": {},
         "caption": "greener", "img_set": {"id": 0, "members": ["dev-1-0-img0", "dev-1-0-img1"]}}])
    _json(root / "captions" / "cap.rc2.test1.json", [
        {"pairid": 5, "reference": "test1-3-0-img1", "caption": "redder",
         "img_set": {"id": 3, "members": ["test1-3-0-img0", "test1-3-0-img1"], "reference_rank": 1}}])
    return root


def test_cirr_triplets_and_gallery(tmp_path):
    root = _cirr(tmp_path / "cirr")
    train = CIRRTriplets(root, "train")
    assert len(train) == 2 and train.records[0]["img_set"]["members"][0] == "train-1-0-img0"
    item = train[1]
    assert item["pairid"] == 13 and item["caption"] == "make it red" and item["index"] == 1
    assert item["reference_name"] == "train-7-1-img0" and item["target_name"] == "train-1-0-img0"
    assert np.asarray(item["reference"])[0, 0].tolist() == [0, 0, 200]  # third image: blue
    assert np.asarray(item["target"])[0, 0].tolist() == [200, 0, 0]

    val = CIRRTriplets(root, "val", transform=make_transform("targetpad", 16))
    v = val[0]
    assert v["reference"].shape == (3, 16, 16) and v["target_name"] == "dev-1-0-img1"

    test = CIRRTriplets(root, "test1")
    t = test[0]
    assert "target" not in t and "target_name" not in t and t["reference_name"] == "test1-3-0-img1"

    gallery = CIRRGallery(root, "val")
    assert gallery.names == ["dev-1-0-img0", "dev-1-0-img1"]
    g = gallery[1]
    assert g["name"] == "dev-1-0-img1" and g["index"] == 1 and np.asarray(g["image"])[0, 0].tolist() == [0, 200, 0]


def test_cirr_errors(tmp_path):
    root = _cirr(tmp_path / "cirr")
    with pytest.raises(DataError, match="unknown CIRR split 'dev'"):
        CIRRTriplets(root, "dev")
    with pytest.raises(DataError, match="nowhere: CIRR root not found"):
        CIRRGallery(tmp_path / "nowhere", "train")
    (root / "dev" / "dev-1-0-img1.png").unlink()
    with pytest.raises(DataError, match=r"dev-1-0-img1\.png: CIRR image not found"):
        CIRRGallery(root, "val")
    (root / "captions" / "cap.rc2.train.json").unlink()
    with pytest.raises(DataError, match=r"cap\.rc2\.train\.json: CIRR caption file .* not found"):
        CIRRTriplets(root, "train")
    _json(root / "captions" / "cap.rc2.train.json", [{"pairid": 1, "reference": "ghost", "target_hard": "x",
                                                       "caption": "c", "img_set": {}}])
    with pytest.raises(DataError, match="triplet #0 names image 'ghost', absent from split.rc2.train.json"):
        CIRRTriplets(root, "train")


def test_cirr_bad_image_skipped_and_counted(tmp_path):
    root = _cirr(tmp_path / "cirr")
    bad = root / "train" / "2" / "train-7-1-img0.png"
    bad.write_bytes(b"not a png")
    strict = CIRRTriplets(root, "train")
    assert strict[0] is not None
    with pytest.raises(DataError, match=r"train-7-1-img0\.png: unreadable or corrupt image"):
        strict[1]
    lenient = CIRRTriplets(root, "train", transform=make_transform("clip", 8), skip_bad_images=True)
    batches = list(DataLoader(lenient, batch_size=2, collate_fn=collate_skip_none))
    assert len(batches) == 1 and batches[0]["pairid"].tolist() == [12]
    assert lenient.bad_images.count == 1 and lenient.bad_images.paths == [str(bad.resolve())]


# ---------------------------------------------------------------- COCO


def _coco(root: Path, split: str = "val2017") -> Path:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 12, "height": 10} for i in (42, 7, 19)]
    for im in images:
        _img(root / split / im["file_name"], im["id"])
    anns = [  # image 7: cat 1 (area 10 + 30) and cat 2 (area 35); image 42: cat 3; image 19: none
        {"id": 1, "image_id": 7, "category_id": 1, "area": 10.0, "bbox": [0, 0, 2, 5], "iscrowd": 0,
         "segmentation": [[0, 0, 2, 0, 2, 5, 0, 5]]},
        {"id": 2, "image_id": 7, "category_id": 2, "area": 35.0, "bbox": [0, 0, 5, 7], "iscrowd": 0,
         "segmentation": [[0, 0, 5, 0, 5, 7, 0, 7]]},
        {"id": 3, "image_id": 7, "category_id": 1, "area": 30.0, "bbox": [0, 0, 5, 6], "iscrowd": 0,
         "segmentation": [[0, 0, 5, 0, 5, 6, 0, 6]]},
        {"id": 4, "image_id": 42, "category_id": 3, "area": 4.0, "bbox": [1, 1, 2, 2], "iscrowd": 0,
         "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
    ]
    cats = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "car", "supercategory": "vehicle"}]
    _json(root / "annotations" / f"instances_{split}.json", {"images": images, "annotations": anns, "categories": cats})
    caps = [{"id": 9, "image_id": 7, "caption": "two cats and a dog"}, {"id": 3, "image_id": 7, "caption": "pets"},
            {"id": 5, "image_id": 19, "caption": "nothing"}]
    _json(root / "annotations" / f"captions_{split}.json", {"images": images, "annotations": caps})
    return root


def test_coco_images(tmp_path):
    root = _coco(tmp_path / "coco")
    ds = COCOImages(root, transform=make_transform("clip", 8))
    assert ds.image_ids == [7, 42] and [p.name for p in ds.paths] == ["000000000007.jpg", "000000000042.jpg"]
    item = ds[1]
    assert item["image_id"] == 42 and item["index"] == 1 and item["image"].shape == (3, 8, 8)
    assert item["path"].endswith("000000000042.jpg")
    assert ds.categories_of(7) == frozenset({1, 2}) and ds.categories_of(42) == frozenset({3})
    assert ds.primary_category(7) == 1  # 10 + 30 > 35
    everything = COCOImages(root, require_instances=False)
    assert everything.image_ids == [7, 19, 42] and everything.categories_of(19) == frozenset()
    with pytest.raises(DataError, match="image id 19 has no instance annotation"):
        everything.primary_category(19)
    _json(root / "annotations" / "captions_val2017.json", {"images": [], "annotations": 3})
    with pytest.raises(DataError, match=r"captions_val2017\.json: not a COCO captions file"):
        COCOCaptions(root, "val2017")


def test_coco_captions_and_errors(tmp_path):
    root = _coco(tmp_path / "coco")
    caps = COCOCaptions(root, "val2017")
    assert [(c["image_id"], c["caption"]) for c in caps] == [(7, "pets"), (7, "two cats and a dog"), (19, "nothing")]
    with pytest.raises(DataError, match=r"instances_train2017\.json: instances file not found"):
        COCOImages(root, "train2017")
    (root / "val2017" / "000000000042.jpg").unlink()
    with pytest.raises(DataError, match=r"000000000042\.jpg: COCO image not found"):
        COCOImages(root)
    (root / "annotations" / "instances_val2017.json").write_text("{broken")
    with pytest.raises(DataError, match=r"instances_val2017\.json: not a valid instances file"):
        COCOImages(root)


# ---------------------------------------------------------------- Food-101


def _food(root: Path, per_class: int = 10) -> Path:
    for split, n in (("train", per_class), ("test", 2)):
        rows = []
        for c, cls in enumerate(["apple_pie", "bibimbap", "churros"]):
            for i in range(n):
                name = f"{cls}_{i}.jpg"
                _img(root / "images" / split / cls / name, c)
                rows.append(f'{name},"best {cls}, {i}",{cls}')
        (root / "texts").mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(rows) + "\n")
    return root


def test_food101_splits_and_items(tmp_path):
    root = _food(tmp_path / "food")
    train, val, test = (Food101(root, s) for s in ("train", "val", "test"))
    assert train.class_names == ["apple_pie", "bibimbap", "churros"] and train.num_classes == 3
    assert (len(train), len(val), len(test)) == (27, 3, 6)  # one of 10 per class to val
    assert not set(map(str, train.paths)) & set(map(str, val.paths))
    assert sorted(int(l) for l in val.labels) == [0, 1, 2]
    item = test[3]
    assert item["text"] == "best bibimbap, 1" and item["label"].dtype == torch.long and int(item["label"]) == 1
    assert np.asarray(item["image"]).shape == (10, 12, 3)
    # the carve is stable and depends only on the class's own rows
    assert [str(p) for p in Food101(root, "val").paths] == [str(p) for p in val.paths]
    other_seed = Food101(root, "val", val_seed=1)
    assert len(other_seed) == 3
    assert train.task == "multiclass" and train.name == "food101"


def test_food101_errors(tmp_path):
    root = _food(tmp_path / "food")
    (root / "texts" / "test_titles.csv").unlink()
    with pytest.raises(DataError, match=r"test_titles\.csv: Food-101 titles file not found"):
        Food101(root, "test")
    (root / "images" / "train" / "churros" / "churros_4.jpg").unlink()
    with pytest.raises(DataError, match=r"churros_4\.jpg: Food-101 image not found"):
        Food101(root, "train")
    with pytest.raises(DataError, match="unknown Food-101 split 'dev'"):
        Food101(root, "dev")


# ---------------------------------------------------------------- MM-IMDb


@pytest.mark.parametrize("layout", ["dataset", "images+labels"])
def test_mmimdb_layouts_and_labels(tmp_path, layout):
    root = tmp_path / "mmimdb"
    movies = {"0000001": (["plot one", "plot two"], ["Drama", "Sci-Fi", "Reality-TV"]),
              "0000002": (["only plot"], ["film-noir", "Comedy"]),
              "0000003": (["test plot"], ["Western"])}
    for k, (mid, (plots, genres)) in enumerate(movies.items()):
        meta_dir, img_dir = (root / "dataset",) * 2 if layout == "dataset" else (root / "labels", root / "images")
        _json(meta_dir / f"{mid}.json", {"plot": plots, "genres": genres, "title": mid})
        _img(img_dir / f"{mid}.jpeg", k, size=(10, 15))
    _json(root / "split.json", {"train": ["0000001", "0000002"], "dev": ["0000003"], "test": []})
    train = MMIMDb(root, "train", transform=make_transform("clip", 8))
    assert len(train) == 3 and train.texts == ["plot one", "plot two", "only plot"]
    assert train.movie_ids == ["0000001", "0000001", "0000002"]
    item = train[0]
    want = torch.zeros(23)
    want[[MMIMDB_GENRES.index("Drama"), MMIMDB_GENRES.index("Sci-Fi")]] = 1
    assert item["label"].dtype == torch.float32 and torch.equal(item["label"], want)
    assert torch.equal(train[2]["label"].nonzero().flatten(), torch.tensor([1, 22]))  # Comedy, Film-Noir
    assert item["image"].shape == (3, 8, 8)
    assert len(MMIMDb(root, "val")) == 1 and len(MMIMDb(root, "test")) == 0
    assert train.num_classes == 23 and train.task == "multilabel"


def test_mmimdb_errors(tmp_path):
    root = tmp_path / "mmimdb"
    (root / "dataset").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split\.json: MM-IMDb split file not found"):
        MMIMDb(root, "train")
    _json(root / "split.json", {"train": ["9"], "dev": [], "test": []})
    with pytest.raises(DataError, match=r"dataset/9\.json: MM-IMDb movie file not found"):
        MMIMDb(root, "train")
    _json(root / "dataset" / "9.json", {"plot": ["p"], "genres": ["Drama"]})
    with pytest.raises(DataError, match=r"dataset/9\.jpeg: MM-IMDb poster not found"):
        MMIMDb(root, "train")


# ---------------------------------------------------------------- Hateful Memes


def _memes(root: Path) -> Path:
    rows = {"train.jsonl": [(42, 1, "mean words"), (7, 0, "kind words")], "dev_seen.jsonl": [(8, 0, "hello")],
            "test_seen.jsonl": [(9, 1, "bye")]}
    for file, items in rows.items():
        lines = []
        for mid, label, text in items:
            _img(root / "img" / f"{mid:05d}.png", mid)
            lines.append(json.dumps({"id": mid, "img": f"img/{mid:05d}.png", "label": label, "text": text}))
        (root / file).write_text("\n".join(lines) + "\n")
    return root


def test_hateful_memes(tmp_path):
    root = _memes(tmp_path / "hm")
    train = get_classification_dataset("hateful-memes", root, "train")
    assert isinstance(train, HatefulMemes) and train.num_classes == 2 and train.task == "binary"
    assert [(int(it["label"]), it["text"]) for it in train] == [(1, "mean words"), (0, "kind words")]
    assert train[0]["label"].dtype == torch.long and train[0]["label"].shape == ()
    assert len(HatefulMemes(root, "val")) == 1 and HatefulMemes(root, "test").texts == ["bye"]
    (root / "train.jsonl").write_text('{"id": 1, "img": "img/00001.png", "text": "x"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:1: expected a JSON row"):
        HatefulMemes(root, "train")
    (root / "train.jsonl").write_text('{"id": 1, "img": "img/00001.png", "text": "x", "label": 0}\n')
    with pytest.raises(DataError, match=r"img/00001\.png: Hateful Memes image not found"):
        HatefulMemes(root, "train")


def test_bad_image_in_classification_dataset(tmp_path):
    root = _memes(tmp_path / "hm")
    (root / "img" / "00042.png").write_bytes(b"\x89PNG broken")
    ds = HatefulMemes(root, "train", transform=make_transform("clip", 8), skip_bad_images=True)
    assert ds[0] is None and ds[1]["text"] == "kind words"
    assert ds.bad_images.count == 1 and ds.bad_images.paths[0].endswith("00042.png")
    batch = collate_skip_none([ds[0], ds[1]])
    assert batch["label"].tolist() == [0]
    with pytest.raises(DataError, match=r"00042\.png: unreadable or corrupt image"):
        HatefulMemes(root, "train")[0]


def test_registry(tmp_path):
    root = _food(tmp_path / "food", per_class=3)
    assert isinstance(get_classification_dataset("food101", root, "test"), Food101)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        get_classification_dataset("imagenet", root, "test")
