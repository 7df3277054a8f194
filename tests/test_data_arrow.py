"""ViLT-style Arrow files (IPC file and stream formats) read as classification datasets."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from mora_retrieval.data.arrow import ArrowClassification
from mora_retrieval.data.images import make_transform
from mora_retrieval.errors import DataError


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, table: pa.Table, stream: bool = False) -> None:
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            writer.write_table(table)


def test_food101_file_format(tmp_path):
    table = pa.table({"image": [_png((255, 0, 0)), _png((0, 0, 255))], "text": [["red pie"], ["blue soup"]],
                      "label": [3, 100], "split": ["train", "train"]})
    _write(tmp_path / "food101_train.arrow", table)
    _write(tmp_path / "food101_val.arrow", table.slice(0, 1))
    ds = ArrowClassification(tmp_path, "train", transform=make_transform("targetpad", 8))
    assert ds.name == "food101" and ds.task == "multiclass" and ds.num_classes == 101 and len(ds) == 2
    item = ds[1]
    assert item["text"] == "blue soup" and item["label"].dtype == torch.long and int(item["label"]) == 100
    assert item["image"].shape == (3, 8, 8) and item["image"][2].mean() > item["image"][0].mean()
    assert len(ArrowClassification(tmp_path, "val")) == 1
    with pytest.raises(DataError, match=r"expected exactly one \*_test\.arrow file \(found: none\)"):
        ArrowClassification(tmp_path, "test")


def test_mmimdb_stream_format_one_sample_per_plot(tmp_path):
    labels = [[1.0 if i in (0, 10) else 0.0 for i in range(23)], [0.0] * 22 + [1.0]]
    table = pa.table({"image": [_png((0, 255, 0)), _png((9, 9, 9))], "plots": [["p1", "p2"], ["q"]],
                      "label": labels, "genres": [["Drama", "Sci-Fi"], ["Film-Noir"]]})
    _write(tmp_path / "mmimdb_dev.arrow", table, stream=True)
    ds = ArrowClassification(tmp_path, "val")
    assert ds.task == "multilabel" and ds.num_classes == 23 and ds.class_names[10] == "Sci-Fi"
    assert ds.texts == ["p1", "p2", "q"] and ds.rows == [0, 0, 1]
    assert torch.equal(ds[1]["label"], torch.tensor(labels[0])) and ds[1]["label"].dtype == torch.float32
    assert np.asarray(ds[2]["image"])[0, 0].tolist() == [9, 9, 9]


def test_hateful_memes_bad_image_and_errors(tmp_path):
    table = pa.table({"image": [b"not an image", _png((1, 2, 3))], "text": [["a"], ["b"]], "label": [1, 0]})
    path = tmp_path / "hatememes_test.arrow"
    _write(path, table)
    ds = ArrowClassification(path)
    assert ds.task == "binary" and ds.num_classes == 2
    with pytest.raises(DataError, match=r"hatememes_test\.arrow\[row 0\]: unreadable or corrupt image"):
        ds[0]
    lenient = ArrowClassification(path, skip_bad_images=True)
    assert lenient[0] is None and lenient[1]["text"] == "b" and lenient.bad_images.count == 1
    bad = tmp_path / "junk.arrow"
    bad.write_bytes(b"nothing arrow here")
    with pytest.raises(DataError, match=r"junk\.arrow: not an Arrow IPC file or stream"):
        ArrowClassification(bad, num_classes=2)
    _write(tmp_path / "other.arrow", pa.table({"image": [_png((0, 0, 0))], "caption": [["x"]], "label": [0]}))
    with pytest.raises(DataError, match=r"other\.arrow: column 'text/plots' not found"):
        ArrowClassification(tmp_path / "other.arrow")
    renamed = ArrowClassification(tmp_path / "other.arrow", num_classes=2, text_column="caption")
    assert renamed.texts == ["x"] and int(renamed[0]["label"]) == 0
    _write(tmp_path / "cols.arrow", pa.table({"img": [_png((0, 0, 0))], "caption": [["y"]], "target": [1]}))
    cols = ArrowClassification(tmp_path / "cols.arrow", num_classes=2, text_column="caption", image_column="img",
                               label_column="target")
    assert cols[0]["text"] == "y" and int(cols[0]["label"]) == 1 and cols[0]["image"] is not None
    with pytest.raises(DataError, match=r"cols\.arrow: column 'image' not found"):
        ArrowClassification(tmp_path / "cols.arrow", num_classes=2, text_column="caption")
    _write(tmp_path / "hatememes_train.arrow", pa.table({"image": [_png((0, 0, 0))], "text": [["x"]], "label": [5]}))
    with pytest.raises(DataError, match="row 0 has label 5, outside 0..1"):
        ArrowClassification(tmp_path / "hatememes_train.arrow")
