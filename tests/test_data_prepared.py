"""The prepared-image cache: pixels equal the PIL transform's, validation, interrupted builds, bad images."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mora_retrieval.data import prepared as prep
from mora_retrieval.data.collate import collate_skip_none
from mora_retrieval.data.images import (PreprocessSpec, load_image, make_transform, make_uint8_transform,
                                        preprocess_spec)
from mora_retrieval.data.prepared import (ImageList, PreparedImageDataset, default_prepared_dir, open_prepared,
                                          prepare_images, prepared_path, stale_reason)
from mora_retrieval.errors import DataError

SPEC = PreprocessSpec(size=16, mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), targetpad_ratio=1.25)
SHAPES = [(40, 30), (30, 60), (50, 50), (64, 20), (20, 33), (45, 44), (70, 35)]


def _images(folder: Path, seed: int = 0, shapes=SHAPES) -> list[Path]:
    """Small JPEGs and PNGs of several aspect ratios (so targetpad pads some of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(shapes):
        path = folder / f"img{i}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _reference(paths, spec: PreprocessSpec) -> torch.Tensor:
    return torch.stack([make_transform(spec)(load_image(p)) for p in paths])


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    from mora_retrieval.data.shapes import generate_shapes_world

    return generate_shapes_world(tmp_path_factory.mktemp("world"), "tiny", seed=0)["cirr"]


def test_cached_pixels_normalised_equal_the_pil_transform_on_the_shapes_world(cirr_root, tiny_model, tmp_path):
    from mora_retrieval.data.cirr import CIRRGallery

    spec = preprocess_spec(tiny_model.model, "targetpad")
    gallery = CIRRGallery(cirr_root, "train", transform=make_transform(spec))
    paths = [gallery.paths_by_name[n] for n in gallery.names]
    cache = prepare_images(paths, spec, prepared_path(tmp_path, "cirr-train", spec), names=gallery.names, workers=0)
    assert cache.pixels.shape == (len(gallery), 3, 32, 32)
    rows = [cache.row(n) for n in gallery.names]
    want = torch.stack([gallery[i]["image"] for i in range(len(gallery))])
    # the cache stores the PIL pipeline's own uint8 pixels, and normalize_uint8 runs ToTensor's and
    # Normalize's float32 operations in the same order: equal, not merely within 1/255
    assert torch.equal(cache.normalize(cache.batch(rows)), want)
    # bf16 output: only bf16's rounding (8 significant bits, 2**-8 relative) apart
    half = cache.normalize(cache.batch(rows), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and ((half.float() - want).abs() <= want.abs() * 2 ** -8).all()


def test_non_openai_statistics_and_workers(tmp_path):
    paths = _images(tmp_path / "imgs")
    serial = prepare_images(paths, SPEC, tmp_path / "a" / "x-16x16.npy", workers=0, chunk=3)
    parallel = prepare_images(paths, SPEC, tmp_path / "b" / "x-16x16.npy", workers=2, chunk=2)
    assert np.array_equal(np.asarray(serial.pixels), np.asarray(parallel.pixels))
    assert torch.equal(serial.normalize(serial.batch(range(len(paths)))), _reference(paths, SPEC))
    plain = PreprocessSpec(size=(12, 20), mean=0.5, std=0.5, resize_mode="squash")
    cache = prepare_images(paths, plain, tmp_path / "c" / "x-12x20.npy", workers=0)
    assert cache.pixels.shape == (len(paths), 3, 12, 20)
    assert torch.equal(cache.normalize(cache.batch(range(len(paths)))), _reference(paths, plain))


def test_each_worker_item_is_one_uint8_batch(tmp_path):
    paths = [str(p) for p in _images(tmp_path)]
    decoder = prep._ChunkDecoder(paths, SPEC, start=2, chunk=3)
    assert len(decoder) == 2  # rows 2-4 and 5-6
    first, batch, bad = decoder[1]
    assert first == 5 and batch.dtype == torch.uint8 and batch.shape == (2, 3, 16, 16) and bad == []
    assert torch.equal(batch[0], make_uint8_transform(SPEC)(load_image(paths[5])))


def test_memmap_file_round_trips(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "cache" / "split-16x16.npy"
    cache = prepare_images(paths, SPEC, path, names=[f"n{i}" for i in range(len(paths))], workers=0, chunk=4)
    # a plain .npy: numpy alone reads it, memory-mapped
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.uint8 and mapped.shape == (len(paths), 3, 16, 16)
    for i, p in enumerate(paths):
        assert np.array_equal(mapped[i], make_uint8_transform(SPEC)(load_image(p)).numpy())
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["shape"] == [len(paths), 3, 16, 16] and sidecar["images"]["names"][3] == "n3"
    assert sidecar["preprocess_key"] == SPEC.key() and sidecar["bad"]["count"] == 0
    assert PreprocessSpec.from_dict(sidecar["preprocess"]) == SPEC
    assert sorted(p.name for p in path.parent.iterdir()) == ["split-16x16.json", "split-16x16.npy", "split-16x16.npy.lock"]
    # reopening reads the file, it does not rebuild it
    calls = []
    again = prepare_images(paths, SPEC, path, names=[f"n{i}" for i in range(len(paths))],
                           progress=lambda d, n: calls.append(d))
    assert calls == [] and again.row("n3") == 3 and torch.equal(again.batch([3]), cache.batch([3]))
    # pickles without its pixels, and maps the file again on use
    payload = pickle.dumps(again)
    assert len(payload) < 4096
    assert torch.equal(pickle.loads(payload).batch([1, 5]), cache.batch([1, 5]))
    with pytest.raises(DataError, match="no image named 'zz'"):
        again.row("zz")


def test_dataset_view_in_a_dataloader(tmp_path):
    paths = _images(tmp_path / "imgs")
    cache = prepare_images(paths, SPEC, tmp_path / "x-16x16.npy", workers=0)
    view = PreparedImageDataset(cache, rows=[6, 0, 3])
    assert len(view) == 3 and torch.equal(view[0], torch.from_numpy(np.array(cache.pixels[6])))
    batches = list(DataLoader(view, batch_size=2, collate_fn=collate_skip_none))
    assert [b.shape[0] for b in batches] == [2, 1] and batches[0].dtype == torch.uint8
    assert torch.equal(batches[0], cache.batch([6, 0]))


def test_validation_refuses_or_rebuilds_a_changed_image_list(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    prepare_images(paths, SPEC, path, workers=0)
    extra = _images(tmp_path / "more", seed=1, shapes=[(33, 21)])
    with pytest.raises(DataError, match=r"x-16x16\.npy: prepared-image cache cannot be used: the image list differs: "
                                        r"1 added \(first: .*more/img0\.png\)"):
        prepare_images(paths + extra, SPEC, path, rebuild=False)
    assert "1 removed" in stale_reason(path, ImageList.stat(paths[:-1]), SPEC)
    assert stale_reason(path, ImageList.stat(paths[::-1]), SPEC) == "the images are listed in another order"
    grown = prepare_images(paths + extra, SPEC, path, workers=0)
    assert len(grown) == len(paths) + 1
    assert torch.equal(grown.normalize(grown.batch([len(paths)])), _reference(extra, SPEC))
    with pytest.raises(DataError, match="not found"):
        prepare_images(paths + [tmp_path / "gone.jpg"], SPEC, path)


def test_validation_sees_a_changed_file(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    before = prepare_images(paths, SPEC, path, workers=0).batch([2])
    Image.new("RGB", (50, 50), (250, 10, 10)).save(paths[2])
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"1 image file\(s\) changed since the build \(first: .*img2\.jpg\)"):
        open_prepared(path, ImageList.stat(paths), SPEC)
    after = prepare_images(paths, SPEC, path, workers=0)
    assert not torch.equal(after.batch([2]), before)
    assert torch.equal(after.normalize(after.batch([2])), _reference(paths[2:3], SPEC))


def test_validation_sees_changed_preprocessing_and_a_changed_data_file(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    prepare_images(paths, SPEC, path, workers=0)
    images = ImageList.stat(paths)
    other_stats = PreprocessSpec(**{**SPEC.__dict__, "mean": (0.5, 0.5, 0.5)})
    no_pad = PreprocessSpec(**{**SPEC.__dict__, "targetpad_ratio": None})
    assert stale_reason(path, images, SPEC) is None
    assert stale_reason(path, images, other_stats) == "the preprocessing differs (mean)"
    with pytest.raises(DataError, match=r"cannot be used: the preprocessing differs \(targetpad_ratio\)"):
        prepare_images(paths, no_pad, path, rebuild=False)
    rebuilt = prepare_images(paths, no_pad, path, workers=0)
    assert torch.equal(rebuilt.normalize(rebuilt.batch(range(len(paths)))), _reference(paths, no_pad))
    assert "differs (targetpad_ratio)" in stale_reason(path, images, SPEC)
    # the data file itself is checked against its sidecar
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x07")
    assert stale_reason(path, images, no_pad) == "its data file x-16x16.npy changed after the build"
    # so is the decoder that produced the pixels
    prepare_images(paths, no_pad, path, workers=0)
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "decoder": {"pillow": "0.1"}}))
    assert "decoded with {'pillow': '0.1'}" in stale_reason(path, images, no_pad)


class _Killed(Exception):
    pass


def _kill_after(images_done: int):
    def progress(done: int, total: int) -> None:
        if done >= images_done:
            raise _Killed(f"killed at {done} of {total}")
    return progress


def test_a_killed_build_leaves_no_valid_cache_and_the_next_build_resumes(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    prepare_images(paths, SPEC, path, workers=0)  # a valid cache of the old preprocessing
    new = PreprocessSpec(**{**SPEC.__dict__, "std": (0.3, 0.3, 0.3)})
    with pytest.raises(_Killed):
        prepare_images(paths, new, path, workers=0, chunk=2, progress=_kill_after(4))
    images = ImageList.stat(paths)
    for spec in (SPEC, new):  # neither the old nor the half-built cache validates
        assert "its build did not finish" in stale_reason(path, images, spec)
        with pytest.raises(DataError, match="x-16x16.npy: prepared-image cache cannot be used: its build did not"):
            open_prepared(path, images, spec)
    starts = []
    resumed = prepare_images(paths, new, path, workers=0, chunk=2, progress=lambda d, n: starts.append(d))
    assert starts[0] == 4 and starts[-1] == len(paths)
    fresh = prepare_images(paths, new, tmp_path / "fresh" / "x-16x16.npy", workers=0)
    assert np.array_equal(np.asarray(resumed.pixels), np.asarray(fresh.pixels))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x-16x16.json", "x-16x16.npy", "x-16x16.npy.lock"]


def test_an_unfinished_build_of_other_images_starts_over(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    with pytest.raises(_Killed):
        prepare_images(paths, SPEC, path, workers=0, chunk=2, progress=_kill_after(2))
    Image.new("RGB", (40, 30), (1, 2, 3)).save(paths[0])
    os.utime(paths[0], ns=(0, os.stat(paths[0]).st_mtime_ns + 10**9))
    starts = []
    cache = prepare_images(paths, SPEC, path, workers=0, chunk=2, progress=lambda d, n: starts.append(d))
    assert starts[0] == 0
    assert torch.equal(cache.normalize(cache.batch(range(len(paths)))), _reference(paths, SPEC))


def test_bad_images_stop_the_build_or_are_skipped_and_counted(tmp_path, caplog):
    paths = _images(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths.insert(3, bad)
    path = tmp_path / "x-16x16.npy"
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable or corrupt image"):
        prepare_images(paths, SPEC, path, workers=0)
    assert stale_reason(path, ImageList.stat(paths), SPEC) is not None
    with caplog.at_level(logging.WARNING, logger="mora_retrieval.data.prepared"):
        cache = prepare_images(paths, SPEC, path, skip_bad_images=True, workers=0)
    assert "1 bad image(s) skipped" in caplog.text and "broken.jpg" in caplog.text
    assert [name for name, _ in cache.bad] == [str(bad)] and "unreadable or corrupt" in cache.bad[0][1]
    assert cache.ok.tolist() == [True, True, True, False] + [True] * (len(paths) - 4)
    assert int(np.asarray(cache.pixels[3]).max()) == 0
    # the bad image alone in its chunk: a chunk of zeros, the same cache
    alone = prepare_images(paths, SPEC, tmp_path / "one" / "x-16x16.npy", skip_bad_images=True, workers=0, chunk=1)
    assert np.array_equal(np.asarray(alone.pixels), np.asarray(cache.pixels)) and alone.ok.tolist() == cache.ok.tolist()
    view = PreparedImageDataset(cache)
    assert view[3] is None and view[4] is not None
    batch = next(iter(DataLoader(view, batch_size=len(view), collate_fn=collate_skip_none)))
    good = [p for p in paths if p != bad]
    assert torch.equal(cache.normalize(batch), _reference(good, SPEC))
    # a strict reader refuses a cache that recorded bad images
    with pytest.raises(DataError, match=r"broken\.jpg: unreadable or corrupt image .*\[1 bad image\(s\) recorded in"):
        prepare_images(paths, SPEC, path)


def test_a_concurrent_builder_waits_and_reuses_the_cache(tmp_path):
    paths = _images(tmp_path / "imgs")
    path = tmp_path / "x-16x16.npy"
    building, release = threading.Event(), threading.Event()

    def slow(done: int, total: int) -> None:
        building.set()
        release.wait(10)

    first = threading.Thread(target=prepare_images, args=(paths, SPEC, path), kwargs={"workers": 0, "progress": slow})
    first.start()
    assert building.wait(10)
    calls, result = [], {}
    second = threading.Thread(target=lambda: result.update(
        cache=prepare_images(paths, SPEC, path, workers=0, progress=lambda d, n: calls.append(d))))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting on the lock, not building a second copy
    release.set()
    first.join(10)
    second.join(10)
    assert calls == [] and len(result["cache"]) == len(paths)


def test_inputs_are_checked_before_anything_is_written(tmp_path, monkeypatch):
    paths = _images(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"x\.bin: a prepared-image cache is a \.npy file"):
        prepare_images(paths, SPEC, tmp_path / "x.bin")
    with pytest.raises(DataError, match="'a' appears more than once"):
        prepare_images(paths[:2], SPEC, tmp_path / "x-16x16.npy", names=["a", "a"])
    with pytest.raises(DataError, match="no images to prepare"):
        prepare_images([], SPEC, tmp_path / "x-16x16.npy")
    monkeypatch.setattr(prep.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"x-16x16\.npy: the prepared images need 5\.2 KiB, only 1000 B are free"):
        prepare_images(paths, SPEC, tmp_path / "out" / "x-16x16.npy", workers=0)
    assert not (tmp_path / "out").exists()


def test_default_location_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    root, twin = tmp_path / "a" / "data", tmp_path / "b" / "data"
    root.mkdir(parents=True)
    twin.mkdir(parents=True)
    assert default_prepared_dir(root) == root.resolve() / "prepared"
    assert not (root / "prepared").exists()  # choosing creates nothing
    assert prepared_path(root / "prepared", "cirr/train", SPEC).name == "cirr_train-16x16.npy"
    # read-only data roots (simulated: the tests may run as root, which can write anywhere)
    real_access = os.access
    monkeypatch.setattr(prep.os, "access", lambda p, mode: Path(p).name != "data" and real_access(p, mode))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fallback = default_prepared_dir(root)
    assert fallback.parent == tmp_path / "cache" / "mora-retrieval" / "prepared" and fallback.name.startswith("data-")
    assert default_prepared_dir(twin) != fallback and default_prepared_dir(twin).name.startswith("data-")
    # a prepared/ folder that exists and can be written is used even if the root cannot be
    (root / "prepared").mkdir()
    assert default_prepared_dir(root) == root.resolve() / "prepared"
