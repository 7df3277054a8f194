"""The embedding pipeline's two decoding paths, run on the CPU.

The tensor-decode path (``gpu_decode``: one byte buffer per batch, batched JPEG decoding,
grouped resizes; :mod:`mora_retrieval.data.tensor_preprocess`) runs the same code with
``device="cpu"`` as on CUDA; it is checked against the model's PIL preprocessing (open_clip's
transform) on the same files.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from retrieval_fixtures import write_tiny_checkpoint
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from mora_retrieval.data.images import load_image, split_transform
from mora_retrieval.data.tensor_preprocess import decode_jpegs, plan_resize_groups, preprocess_decoded, resize_crop
from mora_retrieval.errors import DataError, MoraError
from mora_retrieval.retrieval.embed import EmbedConfig, LoadedBatch, _BatchFiles, batch_plan, decode_path, embed_paths
from mora_retrieval.retrieval.encoder import load_encoder

SHAPES = [(64, 48), (48, 64), (300, 200), (40, 30), (33, 90), (64, 48), (32, 32), (300, 200), (64, 48)]  # (w, h)


def _photo(rng, w, h, noise=6.0, mode="RGB"):
    coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, np.float32) + noise * rng.standard_normal((h, w, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEGs of several sizes (one greyscale), in the order of SHAPES."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SHAPES):
        path = root / f"{i:03d}.jpg"
        _photo(rng, w, h, noise=40.0 if i % 3 == 0 else 6.0, mode="L" if i == 4 else "RGB").save(path, quality=90)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


def _encoder(ckpt, device, dtype=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_encoder("mora-tiny", ckpt, device=device, dtype=dtype)


@pytest.fixture(scope="module")
def encoder(ckpt):
    return _encoder(ckpt, "cpu")


def _decode(path):
    with open(path, "rb") as fh:
        return decode_jpeg(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8), mode=ImageReadMode.RGB)


# ----------------------------------------------------------------------------- plans


def test_grouped_resize_crop_matches_torchvision_per_image():
    shapes = [(480, 640), (640, 480), (427, 640), (31, 97), (32, 32), (10, 11), (1, 50), (480, 640)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes]
    for size, mode in ((32, "shortest"), (224, "shortest"), (32, "squash")):
        pixels, order = resize_crop(images, size, mode, "bilinear")
        for row, i in enumerate(order):
            ref = TF.resize(images[i].float(), size if mode == "shortest" else [size, size], antialias=True)
            assert torch.equal(pixels[row], TF.center_crop(ref, [size, size]).clamp(0, 255).round()), (shapes[i], size)
    with pytest.raises(MoraError, match="longest"):
        resize_crop(images, 224, "longest")


def test_resize_groups_cover_every_image_once_by_shape():
    shapes = [(48, 64), (64, 48), (48, 64), (200, 300), (48, 64), (64, 48), (32, 32)]
    groups = plan_resize_groups(shapes)
    assert groups == [(0, 2, 4), (1, 5), (3,), (6,)]  # first-appearance order
    assert all(len({shapes[i] for i in g}) == 1 for g in groups)
    split = plan_resize_groups(shapes, max_group=2)
    assert split == [(0, 2), (4,), (1, 5), (3,), (6,)]
    assert sorted(i for g in split for i in g) == list(range(len(shapes)))
    with pytest.raises(MoraError, match="empty shape"):
        plan_resize_groups([(0, 5)])


def test_batch_plan_keeps_batches_inside_chunks():
    batches = batch_plan(n=23, chunk_size=10, batch_size=4, pending=[0, 2])
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [20, 21, 22]]
    assert batch_plan(5, 10, 256, []) == []


def test_split_transform_and_tensor_decode_switch(encoder):
    _, mean, std = split_transform(encoder.preprocess)
    assert mean == pytest.approx(encoder.preprocess_cfg["mean"]) and std == pytest.approx(encoder.preprocess_cfg["std"])
    assert split_transform(lambda img: img) is None
    cfg = encoder.preprocess_cfg
    assert decode_path(EmbedConfig(), "cpu", cfg) == "pil"
    assert decode_path(EmbedConfig(fast_jpeg=True), "cpu", cfg) == "pil-draft"
    assert decode_path(EmbedConfig(), "cuda:0", cfg) == "tensor-jpeg"
    assert decode_path(EmbedConfig(fast_jpeg=True), "cuda:0", cfg) == "tensor-jpeg"  # draft mode is PIL's
    assert decode_path(EmbedConfig(gpu_decode=True), "cpu", cfg) == "tensor-jpeg"
    assert decode_path(EmbedConfig(gpu_decode=False), "cuda:0", cfg) == "pil"
    longest = {**cfg, "resize_mode": "longest"}
    assert decode_path(EmbedConfig(), "cuda:0", longest) == "pil"  # falls back to PIL
    with pytest.raises(MoraError, match="'longest'"):
        decode_path(EmbedConfig(gpu_decode=True), "cuda:0", longest)
    from mora_retrieval.device import inference_dtype

    assert inference_dtype(torch.device("cpu")) == torch.float32
    assert inference_dtype(torch.device("cuda", 0)) == torch.bfloat16


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [32, 224])
def test_tensor_preprocessing_matches_pil_preprocessing(files, size):
    """Batched resize + crop of decoded tensors vs open_clip's PIL transform, same files."""
    transform = open_clip.image_transform(size, is_train=False)
    uint8_stage, mean, std = split_transform(transform)
    cfg = {"size": size, "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    decoded = [_decode(p) for p in files]
    pixels, order = resize_crop(decoded, size, max_group=2)  # several groups, some split
    assert pixels.shape == (len(files), 3, size, size) and pixels.dtype == torch.float32
    assert order == [0, 5, 8, 1, 2, 7, 3, 4, 6]  # same-size images are consecutive rows
    assert torch.equal(pixels, pixels.round().clamp(0, 255))
    for row, i in enumerate(order):
        img = load_image(files[i])
        assert np.array_equal(decoded[i].permute(1, 2, 0).numpy(), np.asarray(img))  # same decoder output
        ref = uint8_stage(img).float()
        diff = (pixels[row] - ref).abs()
        assert diff.mean() < 0.35 and diff.max() <= 12, (files[i], diff.mean(), diff.max())  # PIL rounds between passes
    batch, order = preprocess_decoded(decoded, cfg)
    ref = torch.stack([transform(load_image(files[i])) for i in order])
    assert batch.shape == ref.shape and (batch - ref).abs().mean() < 0.01


def test_tensor_path_features_within_1e2_cosine_of_pil_path(files, encoder):
    decoded = [_decode(p) for p in files]
    batch, order = preprocess_decoded(decoded, encoder.preprocess_cfg)
    ours = encoder.encode_images(batch)
    ref = encoder.encode_images(torch.stack([encoder.preprocess(load_image(files[i])) for i in order]))
    cos = (ours * ref).sum(1)
    assert cos.min() > 1 - 1e-2, cos


def test_pipeline_and_single_queries_give_the_same_bf16_features(files, ckpt):
    """Gallery images and query images run the same weights: the same bits for the same batch."""
    from mora_retrieval.retrieval.search import Query, encode_queries

    half = _encoder(ckpt, "cpu", torch.bfloat16)
    images = [half.preprocess(load_image(p)) for p in files]
    single = torch.cat([half.encode_images(image[None], normalize=False) for image in images])
    alone = embed_paths(half, files, EmbedConfig(batch_size=1, workers=0, normalize=False, gpu_decode=False))
    assert np.array_equal(alone.features, single.numpy())
    batched = embed_paths(half, files, EmbedConfig(batch_size=4, workers=0, normalize=False, gpu_decode=False))
    want = torch.cat([half.encode_images(torch.stack(images[s : s + 4]), normalize=False) for s in range(0, 9, 4)])
    assert np.array_equal(batched.features, want.numpy())
    query = encode_queries(half, [Query(image=load_image(files[0]))])
    assert np.array_equal(query[0], F.normalize(single[0], dim=-1).numpy())


# ----------------------------------------------------------------------------- transport


def test_workers_send_one_buffer_per_batch(files, encoder, tmp_path):
    png = tmp_path / "x.png"
    Image.open(files[0]).save(png)
    fake = tmp_path / "png-inside.jpg"  # a PNG with a .jpg name: decoded by PIL in the worker
    fake.write_bytes(png.read_bytes())
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = files[:3] + [str(png), str(fake), str(empty)]
    raw = _BatchFiles(paths, encoder.preprocess, raw_jpeg=True)[list(range(len(paths)))]
    assert isinstance(raw, LoadedBatch)
    assert raw.jpeg_positions == [0, 1, 2] and raw.image_positions == [3, 4]
    assert [p for p, _ in raw.bad] == [5] and "empty.jpg" in raw.bad[0][1]
    blobs = [open(p, "rb").read() for p in files[:3]]
    assert raw.jpeg_offsets == np.cumsum([0] + [len(b) for b in blobs]).tolist()
    assert bytes(raw.jpeg_data.numpy()) == b"".join(blobs)
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (2, 3, 32, 32)

    cpu = _BatchFiles(paths[:5], encoder.preprocess, raw_jpeg=False)[[0, 1, 2, 3, 4]]
    assert cpu.jpeg_data is None and cpu.image_positions == [0, 1, 2, 3, 4] and not cpu.normalized
    assert cpu.images.dtype == torch.uint8 and cpu.images.is_contiguous()
    uint8_stage, _, _ = split_transform(encoder.preprocess)
    assert torch.equal(cpu.images[1], uint8_stage(load_image(files[1])))
    assert torch.equal(raw.images[1], uint8_stage(load_image(fake)))  # the bad file's row is left out
    # a transform that cannot be split ships its float output, still one tensor per batch
    opaque = _BatchFiles(paths[:2], lambda img: encoder.preprocess(img), raw_jpeg=False)[[0, 1]]
    assert opaque.normalized and opaque.images.dtype == torch.float32 and opaque.images.shape == (2, 3, 32, 32)


def test_cpu_path_values_equal_the_model_preprocessing(files, encoder):
    """uint8 transport + normalisation in the main process gives the transform's exact values."""
    ours = embed_paths(encoder, files, EmbedConfig(batch_size=4, workers=0, normalize=False))
    ref = torch.stack([encoder.preprocess(load_image(p)) for p in files])
    with torch.inference_mode():
        want = torch.cat([encoder.model.encode_image(ref[s : s + 4]).float() for s in range(0, len(files), 4)])
    assert np.array_equal(ours.features, want.numpy())
    opaque = dataclasses.replace(encoder, preprocess=lambda img: encoder.preprocess(img))
    assert np.array_equal(embed_paths(opaque, files, EmbedConfig(batch_size=4, workers=0, normalize=False)).features, ours.features)


def test_decode_jpegs_isolates_bad_files_and_falls_back_to_pil(files, monkeypatch):
    blobs = [open(p, "rb").read() for p in files[:3]]
    blobs[1] = b"\xff\xd8\xff" + b"\x00" * 50  # JPEG signature, corrupt body
    data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    images, bad = decode_jpegs(data, offsets, ["a.jpg", "b.jpg", "c.jpg"], "cpu")
    assert images[1] is None and [i for i, _ in bad] == [1] and "b.jpg" in bad[0][1] and "\n" not in bad[0][1]
    assert torch.equal(images[0], _decode(files[0])) and torch.equal(images[2], _decode(files[2]))

    import torchvision.io

    real = torchvision.io.decode_jpeg
    size_of_first = len(blobs[0])

    def refuses_the_first(blob, **kw):  # a decoder that cannot read one (valid) file
        if isinstance(blob, list) or blob.numel() == size_of_first:
            raise RuntimeError("unsupported JPEG")
        return real(blob, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses_the_first)
    images, bad = decode_jpegs(data, offsets, ["a.jpg", "b.jpg", "c.jpg"], "cpu")
    assert torch.equal(images[0], _decode(files[0]))  # PIL read it instead
    assert torch.equal(images[2], _decode(files[2]))
    assert [i for i, _ in bad] == [1] and "b.jpg" in bad[0][1] and "tensor JPEG decoder" in bad[0][1]


# ----------------------------------------------------------------------------- the whole run


def test_tensor_decode_run_matches_cpu_run(files, encoder, tmp_path):
    png = tmp_path / "extra.png"
    Image.open(files[2]).save(png)
    paths = files + [str(png)]
    cpu = embed_paths(encoder, paths, EmbedConfig(batch_size=4, workers=0, gpu_decode=False))
    for workers in (0, 2):
        tensor = embed_paths(encoder, paths, EmbedConfig(batch_size=4, chunk_size=6, workers=workers, gpu_decode=True))
        assert np.array_equal(tensor.positions, cpu.positions) and tensor.skipped == []
        cos = (tensor.features.astype(np.float32) * cpu.features.astype(np.float32)).sum(1)
        assert cos.min() > 1 - 1e-2, cos
    # the PNG takes the workers' PIL path inside a tensor-decode batch: same values as the CPU run
    assert np.array_equal(tensor.features[-1], cpu.features[-1])


def test_tensor_decode_bad_image_policy(files, encoder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x11" * 200)
    paths = files[:3] + [str(bad)] + files[3:5]
    cfg = dict(batch_size=4, workers=0, gpu_decode=True)
    with pytest.raises(DataError) as err:
        embed_paths(encoder, paths, EmbedConfig(**cfg))
    assert "broken.jpg" in str(err.value) and "--skip-bad-images" in str(err.value) and "\n" not in str(err.value)
    result = embed_paths(encoder, paths, EmbedConfig(skip_bad_images=True, **cfg))
    assert result.skipped == [3] and result.positions.tolist() == [0, 1, 2, 4, 5]
    good = embed_paths(encoder, files[:3] + files[3:5], EmbedConfig(**cfg))
    assert np.allclose(result.features.astype(np.float32), good.features.astype(np.float32), atol=1e-3)


@pytest.mark.gpu
def test_gpu_pipeline_bf16_matches_cpu_preprocessing(files, encoder, ckpt):
    """On CUDA: nvJPEG, batched GPU resize, side-stream overlap and the bf16 weights."""
    cuda = _encoder(ckpt, "cuda")
    assert decode_path(EmbedConfig(), cuda.device, cuda.preprocess_cfg) == "tensor-jpeg"
    gpu = embed_paths(cuda, files, EmbedConfig(batch_size=4, chunk_size=6, workers=2))
    ref = embed_paths(encoder, files, EmbedConfig(batch_size=4, workers=0))
    assert np.array_equal(gpu.positions, ref.positions)
    cos = (gpu.features.astype(np.float32) * ref.features.astype(np.float32)).sum(1)
    assert cos.min() > 1 - 1e-2, cos
