"""The embedding pipeline: batched, overlapped, resumable, shardable.

Images are decoded and preprocessed by DataLoader workers (pinned memory on CUDA) while the
model encodes the previous batch. On CUDA, JPEG files are read as bytes by the workers and
decoded on the GPU (``torchvision.io.decode_jpeg(device="cuda")``), then resized, cropped and
normalised there with the model's preprocessing; other formats take the CPU path.

Resuming. Work is cut into *chunks* of ``chunk_size`` images. Each finished chunk is written
to ``<work_dir>/part-NNNNN.npy`` (float16 features) and recorded in
``<work_dir>/progress.json`` together with the weights fingerprint and a digest of the item
list. A rerun with the same model and items skips the recorded chunks; anything else starts
over. All writes are atomic, so an interrupted run never leaves a half-written chunk.

Fast JPEG decoding (``fast_jpeg``, off by default): on the CPU path, JPEGs are decoded by
libjpeg directly at the smallest 1/2, 1/4 or 1/8 scale that still covers the model's input
size (PIL's draft mode), before the usual resize and crop. It makes decoding several times
cheaper for small input sizes; the features differ slightly from the reference preprocessing
(a DCT-domain downscale precedes the bicubic one), so an index and its queries should use
the same setting.

CPU threads: with DataLoader workers on a CPU-only run, the encoding process limits torch to
the cores the workers leave free (restored afterwards), so decoding and encoding do not fight
over the same cores.

Bad images: by default the first unreadable image stops the run with a one-line DataError;
with ``skip_bad_images`` it is left out and its position recorded.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..data.images import load_image
from ..errors import DataError
from ..fileio import atomic_write, read_json, write_json

PROGRESS_FILE = "progress.json"
JPEG_SUFFIXES = (".jpg", ".jpeg")


def default_workers() -> int:
    """DataLoader workers: one per core, at most 8, none on single-core machines."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 1 else min(8, cores)


@dataclass
class EmbedConfig:
    """How to run the pipeline (not what it computes: results do not depend on these)."""

    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    chunk_size: int = 8192
    skip_bad_images: bool = False
    gpu_decode: bool | None = None  # None: on when the encoder runs on CUDA
    fast_jpeg: bool = False  # CPU path: let libjpeg decode at a reduced scale (PIL draft mode)
    normalize: bool = True


@dataclass
class EmbedResult:
    """Features of the kept images, in input order."""

    features: np.ndarray  # [kept, dim]; float16 when normalised, else float32
    positions: np.ndarray  # [kept] int64 positions in the input path list
    skipped: list[int]  # positions of bad images left out
    encoded: int  # images encoded by this call (resumed chunks excluded)


class Reporter(Protocol):
    """Progress sink: ``start`` once, then ``advance`` per encoded batch."""

    def start(self, total: int, completed: int) -> None: ...

    def advance(self, count: int) -> None: ...


class _ImageFiles:
    """Dataset over paths: ``(position, tensor | jpeg bytes | None, error message | None)``."""

    def __init__(self, paths: Sequence[str], transform: Callable, raw_jpeg: bool, draft_size: int | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.raw_jpeg = raw_jpeg
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any, str | None]:
        path = self.paths[position]
        try:
            if self.raw_jpeg and path.lower().endswith(JPEG_SUFFIXES):
                with open(path, "rb") as handle:
                    data = handle.read()
                if not data:
                    raise DataError(f"{path}: unreadable or corrupt image (empty file)")
                return position, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
            if self.draft_size and path.lower().endswith(JPEG_SUFFIXES):
                return position, self.transform(_load_jpeg_draft(path, self.draft_size)), None
            return position, self.transform(load_image(path)), None
        except DataError as exc:
            return position, None, str(exc)
        except OSError as exc:
            return position, None, f"{path}: unreadable image ({exc.__class__.__name__}: {exc})"


def _load_jpeg_draft(path: str, size: int) -> Any:
    """Decode a JPEG at the smallest DCT scale whose sides are still >= ``size``."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for truncated or foreign files
        raise DataError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__}: {exc})") from None


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads (``None``: leave them)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _collate(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[int], list[Any], list[tuple[int, str]]]:
    """Split a batch into CPU-preprocessed tensors, raw JPEG bytes and failures."""
    tensor_pos, tensors, jpeg_pos, jpegs, bad = [], [], [], [], []
    for position, value, error in batch:
        if error is not None:
            bad.append((position, error))
        elif value.dtype == torch.uint8 and value.dim() == 1:
            jpeg_pos.append(position)
            jpegs.append(value)
        else:
            tensor_pos.append(position)
            tensors.append(value)
    stacked = torch.stack(tensors) if tensors else None
    return tensor_pos, stacked, jpeg_pos, jpegs, bad


def gpu_preprocess(images: list[Any], cfg: dict[str, Any]) -> Any:
    """Resize (short side, bicubic), centre-crop and normalise decoded uint8 CHW tensors."""
    size = int(cfg["size"])
    mean = torch.tensor(cfg["mean"], device=images[0].device).view(3, 1, 1)
    std = torch.tensor(cfg["std"], device=images[0].device).view(3, 1, 1)
    out = []
    for image in images:
        image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [size, size])
        out.append((image.float().clamp_(0, 255) / 255.0 - mean) / std)
    return torch.stack(out)


def decode_jpegs_gpu(data: list[Any], paths: list[str], device: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """Decode JPEG bytes on the GPU; returns the images and ``(index, message)`` for failures."""
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)), []
    except RuntimeError:  # one bad file fails the batch: retry one by one to find it
        images, bad = [], []
        for i, (blob, path) in enumerate(zip(data, paths)):
            try:
                images.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                images.append(None)
                bad.append((i, f"{path}: unreadable or corrupt image (GPU JPEG decoder: {str(exc).splitlines()[0]})"))
        return images, bad


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as handle:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        handle.write(buffer.getvalue())


def _load_progress(work_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The recorded chunks if ``progress.json`` matches ``state``; else a fresh record."""
    path = work_dir / PROGRESS_FILE
    if path.is_file():
        try:
            recorded = read_json(path, "embedding progress file")
        except Exception:
            recorded = None
        if isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in state.items()):
            done = recorded.get("done", {})
            if all((work_dir / _part_name(int(c))).is_file() for c in done):
                return {**state, "done": done}
    for stale in work_dir.glob("part-*.npy"):
        stale.unlink()
    return {**state, "done": {}}


def _part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.npy"


def embed_paths(
    encoder: Any,
    paths: Sequence[str],
    config: EmbedConfig | None = None,
    *,
    work_dir: str | Path | None = None,
    run_key: str = "",
    reporter: Reporter | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed every image of ``paths`` with ``encoder`` (a :class:`~.encoder.Encoder`).

    With ``work_dir`` the run is resumable (see the module docstring); ``run_key`` (e.g. a
    digest of the item list) must match for recorded chunks to be reused. ``on_chunk(c)`` is
    called after chunk ``c`` is safely on disk.
    """
    config = config or EmbedConfig()
    paths = [str(p) for p in paths]
    n = len(paths)
    chunk_size = max(1, int(config.chunk_size))
    n_chunks = (n + chunk_size - 1) // chunk_size
    on_cuda = str(encoder.device).startswith("cuda")
    gpu_decode = on_cuda if config.gpu_decode is None else bool(config.gpu_decode)
    dim = encoder.dim

    progress: dict[str, Any] = {"done": {}}
    if work_dir is not None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": encoder.fingerprint,
            "count": n,
            "chunk_size": chunk_size,
            "run_key": run_key,
            "normalize": config.normalize,
        }
        progress = _load_progress(work_dir, state)
    done: dict[str, Any] = progress["done"]
    chunk_feats: dict[int, np.ndarray] = {}
    chunk_skipped: dict[int, list[int]] = {int(c): list(v.get("skipped", [])) for c, v in done.items()}
    pending = [c for c in range(n_chunks) if str(c) not in done]
    completed = sum(min(chunk_size, n - c * chunk_size) for c in range(n_chunks) if str(c) in done)
    if reporter is not None:
        reporter.start(n, completed)

    batches: list[list[int]] = []
    for c in pending:
        stop = min(n, (c + 1) * chunk_size)
        batches.extend(list(range(s, min(stop, s + config.batch_size))) for s in range(c * chunk_size, stop, config.batch_size))
    draft = int(encoder.preprocess_cfg.get("size", 0)) if config.fast_jpeg and not gpu_decode else None
    loader = DataLoader(
        _ImageFiles(paths, encoder.preprocess, raw_jpeg=gpu_decode, draft_size=draft),
        batch_sampler=batches,
        num_workers=config.workers if batches else 0,
        collate_fn=_collate,
        pin_memory=on_cuda,
        persistent_workers=False,
        prefetch_factor=4 if config.workers > 0 and batches else None,
    )

    encoded = 0
    current: int | None = None
    pieces: list[tuple[np.ndarray, np.ndarray]] = []  # (positions, features) of the current chunk

    def flush(chunk: int) -> None:
        order_pos = np.concatenate([p for p, _ in pieces]) if pieces else np.zeros(0, np.int64)
        feats = np.concatenate([f for _, f in pieces]) if pieces else np.zeros((0, dim), np.float32)
        order = np.argsort(order_pos, kind="stable")
        feats = feats[order]
        feats = feats.astype(np.float16) if config.normalize else feats.astype(np.float32)
        chunk_feats[chunk] = feats
        if work_dir is not None:
            _save_npy(work_dir / _part_name(chunk), feats)
            done[str(chunk)] = {"count": int(feats.shape[0]), "skipped": sorted(chunk_skipped.get(chunk, []))}
            write_json(work_dir / PROGRESS_FILE, {**progress, "done": done})
        pieces.clear()
        if on_chunk is not None:
            on_chunk(chunk)

    workers = config.workers if batches else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - workers) if workers > 0 and not on_cuda else None
    with _cpu_threads(threads):
        for tensor_pos, stacked, jpeg_pos, jpegs, bad in loader:
            positions = tensor_pos + jpeg_pos + [p for p, _ in bad]
            chunk = min(positions) // chunk_size
            if current is not None and chunk != current:
                flush(current)
            current = chunk
            feats_list, pos_list = [], []
            if jpegs:
                images, gpu_bad = decode_jpegs_gpu(jpegs, [paths[p] for p in jpeg_pos], encoder.device)
                bad = bad + [(jpeg_pos[i], msg) for i, msg in gpu_bad]
                good = [i for i, img in enumerate(images) if img is not None]
                if good:
                    batch = gpu_preprocess([images[i] for i in good], encoder.preprocess_cfg)
                    feats_list.append(encoder.encode_images(batch, normalize=config.normalize))
                    pos_list.extend(jpeg_pos[i] for i in good)
            if bad and not config.skip_bad_images:
                position, message = min(bad)
                raise DataError(f"{message} (use --skip-bad-images to leave such images out)")
            for position, _ in bad:
                chunk_skipped.setdefault(chunk, []).append(position)
            if stacked is not None:
                feats_list.append(encoder.encode_images(stacked, normalize=config.normalize))
                pos_list.extend(tensor_pos)
            if feats_list:
                feats = torch.cat(feats_list, dim=0).float().cpu().numpy()
                pieces.append((np.asarray(pos_list, dtype=np.int64), feats))
            encoded += len(positions)
            if reporter is not None:
                reporter.advance(len(positions))
    if current is not None:
        flush(current)

    features, positions_out, skipped = [], [], []
    for c in range(n_chunks):
        feats = chunk_feats.get(c)
        if feats is None:
            feats = np.load(work_dir / _part_name(c), allow_pickle=False)
        bad = set(chunk_skipped.get(c, []))
        kept = np.asarray([p for p in range(c * chunk_size, min(n, (c + 1) * chunk_size)) if p not in bad], np.int64)
        if kept.shape[0] != feats.shape[0]:
            raise DataError(f"{work_dir / _part_name(c)}: holds {feats.shape[0]} features, expected {kept.shape[0]}")
        features.append(feats)
        positions_out.append(kept)
        skipped.extend(sorted(bad))
    dtype = np.float16 if config.normalize else np.float32
    return EmbedResult(
        features=np.concatenate(features) if features else np.zeros((0, dim), dtype),
        positions=np.concatenate(positions_out) if positions_out else np.zeros(0, np.int64),
        skipped=skipped,
        encoded=encoded,
    )
