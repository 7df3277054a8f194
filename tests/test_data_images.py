"""Image decoding, the bad-image policy and the two preprocessing pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mora_retrieval.data.images import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, BadImageLog, ImageReader,
                                        TargetPad, load_image, make_transform,
                                        require_files, targetpad_transform)
from mora_retrieval.errors import DataError


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8))


def _reference_targetpad(img: Image.Image, size: int, ratio: float = 1.25) -> np.ndarray:
    """METHOD.md §4 written out step by step with numpy and PIL only."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if max(w, h) / min(w, h) >= ratio:
        goal = max(w, h) / ratio
        ph, pw = int(max(goal - h, 0) / 2), int(max(goal - w, 0) / 2)
        arr = np.pad(arr, ((ph, ph), (pw, pw), (0, 0)))
        h, w = arr.shape[:2]
    short = min(w, h)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = np.asarray(Image.fromarray(arr).resize((nw, nh), Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    crop = resized[top:top + size, left:left + size] / 255.0
    assert short > 0
    out = (crop - np.array(OPENAI_DATASET_MEAN)) / np.array(OPENAI_DATASET_STD)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("w,h", [(100, 40), (30, 90), (50, 45), (64, 64)])
def test_targetpad_matches_reference(w, h):
    img = _gradient(w, h)
    got = targetpad_transform(32)(img).numpy()
    want = _reference_targetpad(img, 32)
    assert got.shape == (3, 32, 32)
    assert np.abs(got - want).max() < 1e-4


def test_targetpad_pads_only_wide_images():
    wide = TargetPad(1.25)(_gradient(100, 40))
    assert wide.size == (100, 80)
    # the padding is black and symmetric: 20 rows above and below
    arr = np.asarray(wide)
    assert arr[:20].max() == 0 and arr[60:].max() == 0 and arr[20:60].max() > 0
    square_ish = _gradient(50, 45)
    assert TargetPad(1.25)(square_ish) is square_ish


def test_clip_transform_is_open_clips_eval_transform():
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN as M, OPENAI_DATASET_STD as S

    assert tuple(M) == OPENAI_DATASET_MEAN and tuple(S) == OPENAI_DATASET_STD
    img = _gradient(70, 40)
    ours = make_transform("clip", 32)(img)
    theirs = open_clip.image_transform(32, is_train=False)(img)
    assert torch.equal(ours, theirs)
    with pytest.raises(DataError, match="unknown transform kind 'foo'"):
        make_transform("foo", 32)


def test_load_image_converts_and_reports_errors(tmp_path):
    Image.new("L", (8, 6), 100).save(tmp_path / "gray.png")
    img = load_image(tmp_path / "gray.png")
    assert img.mode == "RGB" and img.size == (8, 6)
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg: unreadable or corrupt image \("):
        load_image(bad)
    # a truncated PNG fails on decode, not only on open
    good = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="trunc.png: unreadable or corrupt image"):
        load_image(trunc)


def test_reader_skips_and_counts(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("garbage")
    strict = ImageReader(skip_bad_images=False)
    with pytest.raises(DataError, match="bad.png"):
        strict.read(bad)
    lenient = ImageReader(skip_bad_images=True)
    assert lenient.read(bad) is None and lenient.read(bad) is None
    assert lenient.log.count == 1 and lenient.log.paths == [str(bad)]
    assert "unreadable or corrupt" in lenient.log.reasons[0]
    assert BadImageLog().count == 0


def test_require_files_names_first_missing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"b\.jpg: image file not found \(1 more missing\)"):
        require_files([tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"])

