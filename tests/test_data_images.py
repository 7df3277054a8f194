"""Image decoding, the bad-image policy, and preprocessing taken from the model's config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mora_retrieval.data.base import ImageDataset
from mora_retrieval.data.images import (BadImageLog, PreprocessSpec, TargetPad, load_batch,
                                        load_image, make_transform, make_uint8_transform, normalize_uint8,
                                        preprocess_spec, require_files, split_transform)
from mora_retrieval.errors import DataError

# CLIP's published normalisation statistics (OpenAI's CLIP repository), written out here so the
# reference does not take them from the code under test.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8))


def _reference_targetpad(img: Image.Image, size: int, ratio: float = 1.25, mean=CLIP_MEAN, std=CLIP_STD,
                         resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """docs/protocols.md §4 written out step by step with numpy and PIL only."""
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if max(w, h) / min(w, h) >= ratio:
        goal = max(w, h) / ratio
        ph, pw = int(max(goal - h, 0) / 2), int(max(goal - w, 0) / 2)
        arr = np.pad(arr, ((ph, ph), (pw, pw), (0, 0)))
        h, w = arr.shape[:2]
    short = min(w, h)
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = np.asarray(Image.fromarray(arr).resize((nw, nh), resample), dtype=np.float64)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    crop = resized[top:top + size, left:left + size] / 255.0
    assert short > 0
    out = (crop - np.array(mean)) / np.array(std)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("w,h", [(100, 40), (30, 90), (50, 45), (64, 64)])
def test_targetpad_matches_reference(w, h, tiny_model):
    img = _gradient(w, h)
    want = _reference_targetpad(img, 32)
    for transform in (make_transform("targetpad", 32), make_transform(preprocess_spec(tiny_model.model, "targetpad"))):
        got = transform(img).numpy()
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


def test_clip_transform_is_open_clips_eval_transform(tiny_model):
    import open_clip

    img = _gradient(70, 40)
    theirs = open_clip.image_transform(32, is_train=False)(img)
    assert torch.equal(make_transform("clip", 32)(img), theirs)
    assert torch.equal(make_transform(preprocess_spec(tiny_model.model))(img), theirs)
    assert torch.equal(tiny_model.preprocess(img), theirs)
    with pytest.raises(DataError, match="unknown transform kind 'foo'"):
        make_transform("foo", 32)
    with pytest.raises(DataError, match="unknown transform kind 'foo'"):
        preprocess_spec(tiny_model.model, "foo")


def _model_with_config(tmp_path, preprocess_cfg: dict):
    """A tiny open_clip model whose own config (open_clip_config.json, the layout of hub and
    local models) carries ``preprocess_cfg``. open_clip ignores mean/std in configs added with
    ``add_model_config``, so the local-dir schema is how a model brings its own statistics."""
    import json
    import warnings

    import open_clip

    from mora_retrieval.model.backbone import MODEL_CONFIG_DIR

    model_cfg = json.loads((MODEL_CONFIG_DIR / "mora-tiny.json").read_text())
    folder = tmp_path / "siglip-like-tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model_and_transforms(f"local-dir:{folder}")


def test_spec_takes_the_models_own_statistics(tmp_path):
    cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"}
    model, _, their_preprocess = _model_with_config(tmp_path, cfg)
    spec = preprocess_spec(model)
    assert spec == PreprocessSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
                                  resize_mode="squash")
    img = _gradient(70, 40)
    ours = make_transform(spec)(img)
    assert torch.equal(ours, their_preprocess(img))
    # squash: no crop, bilinear; then (x - 0.5) / 0.5, so pixels map to [-1, 1]
    want = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(ours.numpy() - want).max() < 1e-5
    # the same model's targetpad: padded, then its own statistics and interpolation
    pad = preprocess_spec(model, "targetpad")
    assert pad.targetpad_ratio == 1.25 and pad.mean == (0.5, 0.5, 0.5)
    wide = _gradient(100, 40)
    padded = np.asarray(TargetPad(1.25)(wide).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(make_transform(pad)(wide).numpy() - (padded.transpose(2, 0, 1) / 127.5 - 1)).max() < 1e-5
    # the default statistics differ: a model's spec is not OpenAI's
    assert spec.key() != PreprocessSpec(size=32, mean=CLIP_MEAN, std=CLIP_STD).key()


@pytest.mark.parametrize("kind", ["clip", "targetpad"])
def test_shortest_side_spec_matches_reference_with_own_statistics(tmp_path, kind):
    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    model, _, _ = _model_with_config(tmp_path, {"mean": list(mean), "std": list(std)})
    spec = preprocess_spec(model, kind)
    for w, h in [(100, 40), (30, 90), (50, 45)]:
        img = _gradient(w, h)
        want = _reference_targetpad(img, 32, ratio=1.25 if kind == "targetpad" else 1e9, mean=mean, std=std)
        assert np.abs(make_transform(spec)(img).numpy() - want).max() < 1e-4


def test_spec_fields_round_trip_and_validate():
    spec = PreprocessSpec(size=(24, 32), mean=0.5, std=(0.1, 0.2, 0.3), targetpad_ratio=1.25)
    assert spec.size == (24, 32) and spec.mean == (0.5, 0.5, 0.5)
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.key() == spec.key()
    assert PreprocessSpec.from_open_clip({"size": 24, "interpolation": "random"}).interpolation == "bicubic"
    with pytest.raises(DataError, match="std must be positive"):
        PreprocessSpec(size=8, mean=0.5, std=(0.1, 0.0, 0.1))
    with pytest.raises(DataError, match="3 values"):
        PreprocessSpec(size=8, mean=(0.5, 0.5), std=0.5)
    with pytest.raises(DataError, match="unknown resize mode 'crop'"):
        PreprocessSpec(size=8, mean=0.5, std=0.5, resize_mode="crop")
    with pytest.raises(DataError, match="targetpad ratio must be at least 1"):
        PreprocessSpec(size=8, mean=0.5, std=0.5, targetpad_ratio=0.5)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_uint8_transform_then_normalize_equals_the_float_transform(resize_mode):
    spec = PreprocessSpec(size=32, mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), resize_mode=resize_mode,
                          targetpad_ratio=1.25)
    for w, h in [(100, 40), (30, 90), (64, 64)]:
        img = _gradient(w, h)
        pixels = make_uint8_transform(spec)(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        # the same float32 operations as ToTensor + Normalize: identical, not merely close
        assert torch.equal(normalize_uint8(pixels, spec.mean, spec.std), make_transform(spec)(img))
    batch = torch.stack([make_uint8_transform(spec)(_gradient(50, 45))] * 2)
    ref = normalize_uint8(batch, spec.mean, spec.std)
    half = normalize_uint8(batch, spec.mean, spec.std, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ref.shape == (2, 3, 32, 32)
    # bfloat16 keeps 8 significant bits (7 stored): round-to-nearest is off by at most 2**-8 relative
    assert ((half.float() - ref).abs() <= ref.abs() * 2 ** -8).all()
    # float pixels holding the same 0..255 values (the batched resize's output) give the same
    # bits, with mean and std given as tensors; the input is left as it was
    floats = batch.float()
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    assert torch.equal(normalize_uint8(floats, mean, std), ref) and torch.equal(floats, batch.float())
    assert torch.equal(normalize_uint8(floats, mean, std, dtype=torch.bfloat16), half)
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(batch.long(), spec.mean, spec.std)


@pytest.mark.gpu
def test_normalize_uint8_on_cuda_matches_the_cpu_without_a_host_sync():
    spec = PreprocessSpec(size=32, mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3))
    batch = torch.stack([make_uint8_transform(spec)(_gradient(w, 40)) for w in (50, 90)])
    want = normalize_uint8(batch, spec.mean, spec.std)
    pinned, floats = batch.pin_memory(), batch.cuda().float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # from here, any host sync raises
    try:
        on_device = normalize_uint8(pinned, spec.mean, spec.std, device="cuda")
        half = normalize_uint8(floats, spec.mean, spec.std, dtype=torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert on_device.device.type == "cuda" and torch.allclose(on_device.cpu(), want, atol=1e-6)
    assert half.dtype == torch.bfloat16 and ((half.float().cpu() - want).abs() <= want.abs() * 2 ** -8).all()


def test_split_transform_gives_the_uint8_stage_and_statistics():
    spec = PreprocessSpec(size=24, mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), targetpad_ratio=1.25)
    uint8_stage, mean, std = split_transform(make_transform(spec))
    assert (mean, std) == (spec.mean, spec.std)
    img = _gradient(70, 30).convert("L")  # a grey image still gives three channels
    pixels = uint8_stage(img)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    assert torch.equal(normalize_uint8(pixels, mean, std), make_transform(spec)(img))
    assert split_transform(lambda img: img) is None
    assert split_transform(make_uint8_transform(spec)) is None  # no ToTensor + Normalize at its end


def test_load_batch_gives_one_tensor_with_bad_rows_listed(tmp_path):
    spec = PreprocessSpec(size=8, mean=0.5, std=0.5)
    paths = []
    for i, (w, h) in enumerate([(20, 10), (9, 9)]):
        paths.append(str(tmp_path / f"{i}.png"))
        _gradient(w, h).save(paths[-1])
    (tmp_path / "bad.png").write_text("garbage")
    transform = make_uint8_transform(spec)
    pixels, bad = load_batch([paths[0], str(tmp_path / "bad.png"), paths[1]], transform)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 8, 8)
    assert torch.equal(pixels[0], transform(load_image(paths[0])))
    assert torch.equal(pixels[2], transform(load_image(paths[1])))
    assert not pixels[1].any() and [row for row, _ in bad] == [1] and "bad.png: unreadable or corrupt" in bad[0][1]
    assert load_batch([str(tmp_path / "bad.png")], transform) == (None, [(0, bad[0][1])])
    floats, _ = load_batch(paths, make_transform(spec))  # any transform: its dtype, its shape
    assert floats.dtype == torch.float32 and torch.equal(floats[1], make_transform(spec)(load_image(paths[1])))
    with pytest.raises(DataError, match=r"1\.png: the preprocessing gives \[3, 9, 9\] pixels"):
        load_batch(paths, lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_load_image_draft_decodes_jpegs_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (400, 300), (200, 30, 60)).save(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg", draft=32).size == (50, 38)  # 1/8: the smallest covering 32 px
    assert load_image(tmp_path / "big.jpg", draft=200).size == (400, 300)  # 1/2 would give 150 < 200
    assert load_image(tmp_path / "big.jpg").size == (400, 300)
    Image.new("RGB", (400, 300), (200, 30, 60)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", draft=32).size == (400, 300)  # not a JPEG: full size


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


def test_dataset_skips_and_counts_bad_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("garbage")
    strict = ImageDataset(skip_bad_images=False)
    with pytest.raises(DataError, match="bad.png"):
        strict._image(bad)
    lenient = ImageDataset(transform=make_transform("clip", 8), skip_bad_images=True)
    assert lenient._image(bad) is None and lenient._item(bad, index=0) is None
    assert lenient.bad_images.count == 1 and lenient.bad_images.paths == [str(bad)]
    assert "unreadable or corrupt" in lenient.bad_images.reasons[0]
    assert BadImageLog().count == 0 and strict.bad_images.count == 0
    good = tmp_path / "good.png"
    Image.new("RGB", (10, 6), (9, 99, 199)).save(good)
    item = lenient._item(good, index=3, path="x")
    assert set(item) == {"image", "index", "path"} and item["image"].shape == (3, 8, 8)


def test_require_files_names_first_missing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"b\.jpg: image file not found \(1 more missing\)"):
        require_files([tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"])

