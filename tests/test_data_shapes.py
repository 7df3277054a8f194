"""The generated shapes world: layouts read by the loaders, label rules, determinism, the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mora_retrieval.data.cirr import CIRRGallery, CIRRTriplets
from mora_retrieval.data.coco import COCOCaptions, COCOImages
from mora_retrieval.data.images import make_transform
from mora_retrieval.data.mmimdb import MMIMDB_GENRES
from mora_retrieval.data.registry import get_classification_dataset
from mora_retrieval.data.shapes import PARTS, WORLD_SIZES, generate_shapes_world
from mora_retrieval.data.shapes_scene import COLOUR_NAMES, SHAPES
from mora_retrieval.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    roots = generate_shapes_world(out, "tiny", seed=0)
    assert roots == {p: out / p for p in PARTS}
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cirr_part(world):
    t = make_transform("targetpad", 32)
    sizes = WORLD_SIZES["tiny"].cirr_groups
    for split, groups in zip(("train", "val", "test1"), sizes):
        triplets, gallery = CIRRTriplets(world / "cirr", split, t), CIRRGallery(world / "cirr", split)
        assert len(triplets) == 5 * groups and len(gallery) == 6 * groups
        item = triplets[0]
        assert item["reference"].shape == (3, 32, 32) and ("target" in item) == (split != "test1")
        for rec in triplets.records:
            members = rec["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6 and set(members) <= set(gallery.names)
            assert members[rec["img_set"]["reference_rank"]] == rec["reference"]
            if split != "test1":
                assert members[rec["img_set"]["target_rank"]] == rec["target_hard"]
                assert rec["target_soft"] == {rec["target_hard"]: 1.0}
            else:
                assert "target_hard" not in rec
    train_paths = json.loads((world / "cirr/image_splits/split.rc2.train.json").read_text()).values()
    assert all(re.fullmatch(r"\./train/\d{1,2}/train-\d+-img\d\.png", p) for p in train_paths)
    val_paths = json.loads((world / "cirr/image_splits/split.rc2.val.json").read_text()).values()
    assert all(p.startswith("./dev/") for p in val_paths)


def test_cirr_targets_differ_from_reference_by_the_edit(world):
    ds = CIRRTriplets(world / "cirr", "train", make_transform("clip", 32))
    for i in range(5):
        item = ds[i]
        assert not torch.equal(item["reference"], item["target"]), ds.records[i]["caption"]


def test_coco_part_annotations_match_pixels(world):
    from pycocotools import mask as mask_utils

    ds = COCOImages(world / "coco", "val2017")
    everything = COCOImages(world / "coco", "val2017", require_instances=False)
    assert len(everything) == WORLD_SIZES["tiny"].coco_images[1] and 0 < len(ds) <= len(everything)
    assert {c["name"] for c in ds.coco.dataset["categories"]} == set(SHAPES)
    sets = [ds.categories_of(i) for i in ds.image_ids]
    assert len(set(sets)) < len(sets)  # "exact" relevance has repeats
    captions_by_id: dict[int, list[str]] = {}
    for image_id, caption in COCOCaptions(world / "coco", "val2017").pairs:
        captions_by_id.setdefault(image_id, []).append(caption)
    for index in range(5):
        image_id = ds.image_ids[index]
        img = np.asarray(ds[index]["image"], dtype=np.int16)
        union = np.zeros(img.shape[:2], dtype=bool)
        for ann in ds.coco.imgToAnns[image_id]:
            rle = mask_utils.frPyObjects(ann["segmentation"], img.shape[0], img.shape[1])
            union |= mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        drawn = np.abs(img - img[0, 0]).max(axis=2) > 60
        iou = (drawn & union).sum() / (drawn | union).sum()
        assert iou > 0.8, (image_id, iou)
        captions = captions_by_id[image_id]
        assert len(captions) == 5
        for cat in ds.categories_of(image_id):
            assert all(SHAPES[cat - 1] in c for c in captions)
    pairs = COCOCaptions(world / "coco", "train2017")
    assert len(pairs) == 5 * WORLD_SIZES["tiny"].coco_images[0]


def test_food101_part(world):
    splits = {s: get_classification_dataset("food101", world / "food101", s) for s in ("train", "val", "test")}
    n_train, n_test = WORLD_SIZES["tiny"].food_images
    assert len(splits["train"]) + len(splits["val"]) == n_train and len(splits["test"]) == n_test
    ds = splits["test"]
    assert ds.num_classes == 30 and ds.class_names[0] == "blue_circle"
    for i in range(len(ds)):
        colour, shape = ds.class_names[ds.labels[i]].split("_")
        words = ds.texts[i].split()
        assert colour in words and not set(words) & set(SHAPES) - {"shape"}
    # the class colour is drawn, and only by the class object (distractors take other colours)
    from mora_retrieval.data.shapes_scene import COLOURS

    for i in range(10):
        colour = ds.class_names[ds.labels[i]].split("_")[0]
        img = np.asarray(ds[i]["image"], dtype=np.int16)
        close = np.abs(img - np.array(COLOURS[colour])).max(axis=2) < 35
        assert close.sum() > 20


def test_mmimdb_part(world):
    ds = get_classification_dataset("mmimdb", world / "mmimdb", "train", transform=make_transform("clip", 32))
    assert ds.num_classes == 23 and len(ds) >= WORLD_SIZES["tiny"].mmimdb_movies[0]
    assert ds[0]["image"].shape == (3, 32, 32)
    for text, label in zip(ds.texts, ds.labels):
        words = text.replace(",", "").split()
        want = {11 + SHAPES.index(w) for w in words if w in SHAPES}
        want |= {16 + COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES}
        want |= {22} if "large" in words else set()
        got = {i for i in range(11, 23) if label[i] == 1.0}
        assert got == want, (text, [MMIMDB_GENRES[i] for i in got])
        assert sum(label[:5]) >= 1 and sum(label[5:11]) >= 1  # the poster's shapes and colours
    poster = json.loads((world / "mmimdb/split.json").read_text())["train"][0]
    from PIL import Image

    assert Image.open(world / "mmimdb/dataset" / f"{poster}.jpeg").size == (64, 96)


def test_hateful_memes_part_is_an_and(world):
    for split in ("train", "val", "test"):
        ds = get_classification_dataset("hateful_memes", world / "hateful_memes", split)
        for i in range(len(ds)):
            img = np.asarray(ds[i]["image"], dtype=np.int16)
            red = ((img[..., 0] > 150) & (img[..., 1] < 90) & (img[..., 2] < 90)).sum() > 15
            assert int(ds.labels[i]) == int(red and "large" in ds.texts[i].split()), (split, i, ds.texts[i])
        assert 0 < sum(ds.labels) < len(ds)


def test_deterministic_bytes_and_seed(world, tmp_path):
    again = tmp_path / "again"
    generate_shapes_world(again, "tiny", seed=0)
    a, b = _digest(world), _digest(again)
    assert a == b
    generate_shapes_world(again, "tiny", seed=1)  # replaces the world in place
    c = _digest(again)
    assert c.keys() != a.keys() or c != a
    assert json.loads((again / "shapes_world.json").read_text())["seed"] == 1
    assert not [p for p in again.iterdir() if p.name.startswith(".shapes-")]


def test_refuses_foreign_folders(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(DataError, match=r"coco: already exists and is not part of a shapes world"):
        generate_shapes_world(tmp_path, "tiny")
    with pytest.raises(DataError, match="unknown shapes-world size 'huge'"):
        generate_shapes_world(tmp_path / "x", "huge")


def test_cli_shapes(tmp_path):
    import typer
    from typer.testing import CliRunner

    from mora_retrieval_cli.app import build_app

    app = typer.Typer()
    app.callback()(lambda: None)
    build_app(app, ("data",))
    result = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "w"), "--size", "tiny",
                                      "--image-size", "32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "hateful_memes" in result.output and "test_seen" in result.output and "40 triplets" in result.output
    from PIL import Image

    assert Image.open(tmp_path / "w/coco/val2017/000000000061.jpg").size == (32, 32)
    bad = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "v"), "--size", "huge"])
    assert bad.exit_code != 0 and isinstance(bad.exception, DataError)
