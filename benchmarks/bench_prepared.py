"""Images/s of one training epoch's input: the PIL transform every epoch vs the prepared cache.

    OMP_NUM_THREADS=1 python benchmarks/bench_prepared.py [--images 512] [--size 224] [--batch 128] [--epochs 3]
                                        [--workers 0,2] [--device cpu]

Writes ``--images`` generated JPEGs (320x240, 240x320 and 320x320, quality 90) to a temporary
folder, then, with the CIR preprocessing of a ViT-B-16-sized model (targetpad 1.25, bicubic
resize of the short side to ``--size``, centre crop, open_clip's default statistics):

* **PIL transform**: what training does today. A dataset decodes each file and applies
  :func:`make_transform` (PIL, ToTensor, Normalize); a DataLoader with W workers collates
  per-image float tensors into batches. Every epoch pays the decoding again.
* **build**: :func:`prepare_images` decoding into the cache once (W workers, one uint8 tensor
  per chunk).
* **prepared cache**: every later epoch. Shuffled batches of ``--batch`` rows are gathered from
  the memory-mapped file and normalised with :func:`normalize_uint8` (float32, or bfloat16 on
  ``--device``), in the main process or through a DataLoader over :class:`PreparedImageDataset`.

On a small shared CPU machine set OMP_NUM_THREADS=1: torch's intra-op threads in the main
process fight the DataLoader workers and other jobs, which slowed the PIL rows here up to 9x.

Each epoch row is the mean over ``--epochs`` epochs (the first cache epoch included: the file
was just written, so it sits in the page cache, as in training right after a build). Prints one
Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mora_retrieval.data.images import PreprocessSpec, load_image, make_transform
from mora_retrieval.data.prepared import PreparedImageDataset, prepare_images, prepared_path


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth gradients with blobs and light noise (JPEG sizes like photos of that size)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = [(320, 240), (240, 320), (320, 320)]
    paths = []
    for i in range(count):
        w, h = shapes[i % len(shapes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3) + np.stack([x / w * rng.uniform(-120, 120), y / h * rng.uniform(-120, 120),
                                                  (x + y) / (w + h) * rng.uniform(-120, 120)], axis=-1)
        for _ in range(4):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 80)
            base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class PILImages(Dataset):
    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.paths, self.transform = paths, make_transform(spec)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pil_epochs(paths, spec, batch: int, workers: int, epochs: int, device: torch.device) -> float:
    loader = DataLoader(PILImages(paths, spec), batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda")
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for images in loader:
            images.to(device, non_blocking=True)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return len(paths) / float(np.mean(seconds))


def cache_epochs(cache, batch: int, epochs: int, device: torch.device, dtype: torch.dtype | None,
                 workers: int | None) -> float:
    """``workers=None``: gather in the main process; else a DataLoader over the dataset view.
    ``dtype=None``: gather only (the uint8 batch a GPU run hands to the device)."""
    n = len(cache)
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        if workers is None:
            order = np.random.default_rng(epoch).permutation(n)
            for lo in range(0, n, batch):
                images = cache.batch(np.sort(order[lo:lo + batch]))
                if dtype is not None:
                    cache.normalize(images, dtype=dtype, device=device)
        else:
            loader = DataLoader(PreparedImageDataset(cache), batch_size=batch, shuffle=True, num_workers=workers,
                                pin_memory=device.type == "cuda")
            for images in loader:
                cache.normalize(images, dtype=dtype, device=device)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return n / float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    spec = PreprocessSpec.from_open_clip({"size": args.size}, targetpad_ratio=1.25)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp) / "images", args.images)
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        for w in workers:
            rows.append((f"PIL transform every epoch (decode, targetpad, resize, crop, normalise), {w} workers",
                         pil_epochs(paths, spec, args.batch, w, args.epochs, device)))
        for w in workers:
            path = prepared_path(Path(tmp) / f"prepared-{w}", "bench", spec)
            start = time.perf_counter()
            cache = prepare_images(paths, spec, path, workers=w)
            rows.append((f"build the prepared cache (once), {w} workers", len(paths) / (time.perf_counter() - start)))
        rows.append(("prepared cache: memmap gather only (uint8 batches), main process",
                     cache_epochs(cache, args.batch, args.epochs, device, None, None)))
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            rows.append((f"prepared cache: memmap gather + normalize_uint8 ({name}), main process",
                         cache_epochs(cache, args.batch, args.epochs, device, dtype, None)))
        for w in workers:
            rows.append((f"prepared cache: PreparedImageDataset in a DataLoader + normalize_uint8 (float32), {w} workers",
                         cache_epochs(cache, args.batch, args.epochs, device, torch.float32, w)))
        size_mib = os.path.getsize(path) / 2**20
    pil = rows[0][1]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {cores} cores)"
    print(f"# {args.images} JPEGs ({kb:.0f} KB, 320 px), {args.size} px targetpad, batch {args.batch}, "
          f"{where}, {datetime.date.today()}; cache file {size_mib:.0f} MiB")
    print("| input path | images/s | vs first row |")
    print("|---|---:|---:|")
    for label, rate in rows:
        print(f"| {label} | {rate:,.0f} | {rate / pil:.1f}x |")


if __name__ == "__main__":
    main()
