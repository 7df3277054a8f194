"""The embedding pipeline: batched, overlapped, resumable, shardable.

Transport. DataLoader workers send each batch as at most two tensors, never one per image:
every tensor crossing the worker queue costs a shared-memory segment of its own.

* CPU path (the default without CUDA): workers decode with PIL and run the PIL part of the
  model's preprocessing (resize, centre crop); the uint8 ``[B, 3, S, S]`` batch is normalised in
  the main process, giving exactly the values of the model's preprocessing.
* Tensor-decode path (``gpu_decode``, on by default with CUDA): workers only read the files; a
  batch's JPEG bytes arrive as one uint8 buffer plus offsets and are decoded, resized, cropped
  and normalised together on the encoder's device (nvJPEG on CUDA;
  :mod:`~mora_retrieval.data.tensor_preprocess`, which retries a rejected JPEG with PIL). Other
  files are decoded by the workers as on the CPU path, in the same batch. With ``device="cpu"``
  the same code runs on the CPU (that is how the tests cover it).

Batches are prepared in the encoder's dtype and encoded by ``Encoder.encode_images``, the method
single queries use. On CUDA the next batch is decoded on a side stream while the current one is
encoded; the host waits for the device only when a chunk is written.

Resuming. Work is cut into chunks of ``chunk_size`` images, each written atomically to
``<work_dir>/part-NNNNN.npy`` (float16) and recorded in ``<work_dir>/progress.json`` with the
weights fingerprint and a digest of the item list. A rerun with the same model and items skips
the recorded chunks; anything else starts over.

``fast_jpeg`` (CPU path, off by default): libjpeg decodes JPEGs at the smallest 1/2, 1/4 or 1/8
scale that still covers the model's input size (PIL's draft mode), several times cheaper for
small inputs; the features differ slightly from the reference preprocessing, so an index and its
queries should use the same setting.

With DataLoader workers on a CPU-only run, torch is limited to the cores the workers leave free.
The first unreadable image stops the run with a one-line DataError; with ``skip_bad_images`` it
is left out and its position recorded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.images import INTERPOLATIONS, load_batch, normalize_uint8, split_transform
from ..data.tensor_preprocess import BATCHED_RESIZE_MODES, JPEG_SIGNATURE, decode_jpegs, preprocess_decoded
from ..device import available_cores, default_workers
from ..errors import DataError, MoraError
from ..fileio import make_dirs, read_matching_json, write_json
from ..progress import ProgressBar
from .index import save_npy

PROGRESS_FILE = "progress.json"


@dataclass
class EmbedConfig:
    """How to run the pipeline (not what it computes: results do not depend on these)."""

    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    chunk_size: int = 8192
    skip_bad_images: bool = False
    gpu_decode: bool | None = None  # decode JPEGs with torchvision on the encoder's device; None: on CUDA only
    fast_jpeg: bool = False  # CPU path: let libjpeg decode at a reduced scale (PIL draft mode)
    normalize: bool = True


@dataclass
class EmbedResult:
    """Features of the kept images, in input order."""

    features: np.ndarray  # [kept, dim]; float16 when normalised, else float32
    positions: np.ndarray  # [kept] int64 positions in the input path list
    skipped: list[int]  # positions of bad images left out
    encoded: int  # images encoded by this call (resumed chunks excluded)


def batch_plan(n: int, chunk_size: int, batch_size: int, pending: Sequence[int]) -> list[list[int]]:
    """Batches (lists of positions) covering the ``pending`` chunks; no batch spans two chunks."""
    batches: list[list[int]] = []
    step = max(1, int(batch_size))
    for c in pending:
        stop = min(n, (c + 1) * chunk_size)
        batches.extend(list(range(s, min(stop, s + step))) for s in range(c * chunk_size, stop, step))
    return batches


@dataclass
class LoadedBatch:
    """What a worker sends for one batch."""

    image_positions: list[int] = field(default_factory=list)
    images: Any = None  # uint8 [b, 3, S, S] (resized, cropped) or float32 normalised; None when empty
    normalized: bool = False  # True: ``images`` went through the whole transform (float32)
    jpeg_positions: list[int] = field(default_factory=list)
    jpeg_data: Any = None  # uint8 [total bytes]: the JPEG files one after the other
    jpeg_offsets: list[int] = field(default_factory=list)  # len(jpeg_positions) + 1 byte offsets
    bad: list[tuple[int, str]] = field(default_factory=list)  # (position, one-line message)

    def pin_memory(self) -> "LoadedBatch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        return replace(self, images=None if self.images is None else self.images.pin_memory(),
                       jpeg_data=None if self.jpeg_data is None else self.jpeg_data.pin_memory())


class _BatchFiles:
    """Dataset whose items are whole batches: ``dataset[positions] -> LoadedBatch``.

    With ``raw_jpeg`` the JPEG files are only read; every other file is decoded here, by the
    uint8 stage of ``transform`` (:func:`split_transform`) or, when it cannot be split, by the
    whole of it. ``draft_size``: decode JPEGs in PIL's draft mode (see :func:`load_image`).
    """

    def __init__(self, paths: Sequence[str], transform: Callable, raw_jpeg: bool,
                 draft_size: int | None = None) -> None:
        self.paths = list(paths)
        self.split = split_transform(transform)
        self.transform = self.split[0] if self.split else transform
        self.raw_jpeg = raw_jpeg
        self.draft_size = draft_size

    def __getitem__(self, positions: Sequence[int]) -> LoadedBatch:
        batch = LoadedBatch()
        blobs: list[bytes] = []
        decode: list[int] = []  # positions decoded here
        for position in positions:
            if not self.raw_jpeg:
                decode.append(position)
                continue
            path = self.paths[position]
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as exc:
                batch.bad.append((position, f"{path}: unreadable image ({exc.__class__.__name__}: {exc})"))
                continue
            if data.startswith(JPEG_SIGNATURE):
                batch.jpeg_positions.append(position)
                blobs.append(data)
            else:  # read again by PIL: rare in a JPEG gallery, and the file is in the page cache
                decode.append(position)
        if decode:
            images, bad = load_batch([self.paths[p] for p in decode], self.transform, self.draft_size)
            batch.bad.extend((decode[row], message) for row, message in bad)
            failed = {row for row, _ in bad}
            keep = [row for row in range(len(decode)) if row not in failed]
            if keep:
                batch.images = images[keep] if bad else images
                batch.image_positions = [decode[row] for row in keep]
                batch.normalized = self.split is None
        if blobs:
            batch.jpeg_offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
            batch.jpeg_data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        return batch


@dataclass
class _Prepared:
    """A batch ready to encode: images on the device in the pipeline dtype, and its failures."""

    positions: list[int]
    images: Any  # [b, 3, S, S] or None
    bad: list[tuple[int, str]]
    ready: Any = None  # CUDA event recorded on the side stream after the preparation


def _prepare(loaded: LoadedBatch, encoder: Any, paths: Sequence[str], mean_std: tuple[Any, Any],
             stream: Any) -> _Prepared:
    """``loaded`` decoded and normalised on the encoder's device, on the side ``stream`` when given."""
    device, dtype = str(encoder.device), encoder.dtype
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        positions: list[int] = []
        parts: list[Any] = []
        bad = list(loaded.bad)
        if loaded.jpeg_positions:
            decoded, failed = decode_jpegs(loaded.jpeg_data, loaded.jpeg_offsets,
                                           [paths[p] for p in loaded.jpeg_positions], device)
            bad.extend((loaded.jpeg_positions[i], message) for i, message in failed)
            good = [i for i, img in enumerate(decoded) if img is not None]
            if good:
                batch, order = preprocess_decoded([decoded[i] for i in good], encoder.preprocess_cfg, dtype, mean_std)
                parts.append(batch)
                positions.extend(loaded.jpeg_positions[good[j]] for j in order)
        if loaded.images is not None:
            parts.append(loaded.images.to(device, non_blocking=True).to(dtype) if loaded.normalized
                         else normalize_uint8(loaded.images, *mean_std, dtype, device))
            positions.extend(loaded.image_positions)
        images = parts[0] if len(parts) == 1 else (torch.cat(parts) if parts else None)
        return _Prepared(positions, images, bad, None if stream is None else stream.record_event())


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads (``None``: leave them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_progress(work_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The recorded chunks if ``progress.json`` matches ``state``; else a fresh record."""
    recorded = read_matching_json(work_dir / PROGRESS_FILE, state)
    if recorded is not None:
        done = recorded.get("done", {})
        if all((work_dir / _part_name(int(c))).is_file() for c in done):
            return {**state, "done": done}
    for stale in work_dir.glob("part-*.npy"):
        stale.unlink()
    return {**state, "done": {}}


def _part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.npy"


def decode_path(config: EmbedConfig, device: str, cfg: dict[str, Any]) -> str:
    """How :func:`embed_paths` decodes JPEGs (what the index manifest records): ``tensor-jpeg``,
    batched on ``device`` (``gpu_decode``; ``None``: on CUDA when :func:`preprocess_decoded`
    implements the model's preprocessing ``cfg``), else ``pil-draft`` (``fast_jpeg``) or ``pil``."""
    supported = (str(cfg.get("resize_mode", "shortest")) in BATCHED_RESIZE_MODES
                 and str(cfg.get("interpolation", "bicubic")) in INTERPOLATIONS)
    if config.gpu_decode and not supported:
        raise MoraError(
            f"GPU JPEG decoding implements resize modes {', '.join(BATCHED_RESIZE_MODES)} with "
            f"{' or '.join(INTERPOLATIONS)} "
            f"interpolation; the model uses {cfg.get('resize_mode')!r} / {cfg.get('interpolation')!r}: turn gpu_decode off"
        )
    if config.gpu_decode or (config.gpu_decode is None and str(device).startswith("cuda") and supported):
        return "tensor-jpeg"
    return "pil-draft" if config.fast_jpeg else "pil"


def embed_paths(
    encoder: Any,
    paths: Sequence[str],
    config: EmbedConfig | None = None,
    *,
    work_dir: str | Path | None = None,
    run_key: str = "",
    reporter: ProgressBar | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed every image of ``paths`` with ``encoder`` (a :class:`~.encoder.Encoder`), resumably with
    ``work_dir`` (see the module docstring) when ``run_key`` (e.g. a digest of the item list) matches;
    ``on_chunk(c)`` is called after chunk ``c`` is safely on disk."""
    config = config or EmbedConfig()
    paths = [str(p) for p in paths]
    n = len(paths)
    chunk_size = max(1, int(config.chunk_size))
    n_chunks = (n + chunk_size - 1) // chunk_size
    on_cuda = str(encoder.device).startswith("cuda")
    decode = decode_path(config, encoder.device, encoder.preprocess_cfg)
    dim = encoder.dim
    out_dtype = np.float16 if config.normalize else np.float32

    progress: dict[str, Any] = {"done": {}}
    if work_dir is not None:
        work_dir = make_dirs(work_dir, "folder for the embedding chunks")
        progress = _load_progress(work_dir, {"fingerprint": encoder.fingerprint, "count": n, "chunk_size": chunk_size,
                                             "run_key": run_key, "normalize": config.normalize})
    done: dict[str, Any] = progress["done"]
    chunk_feats: dict[int, np.ndarray] = {}
    chunk_skipped: dict[int, list[int]] = {int(c): list(v.get("skipped", [])) for c, v in done.items()}
    pending = [c for c in range(n_chunks) if str(c) not in done]
    completed = sum(min(chunk_size, n - c * chunk_size) for c in range(n_chunks) if str(c) in done)
    if reporter is not None:
        reporter.start(n, completed)

    batches = batch_plan(n, chunk_size, config.batch_size, pending)
    draft = int(encoder.preprocess_cfg.get("size", 0)) if decode == "pil-draft" else None
    dataset = _BatchFiles(paths, encoder.preprocess, raw_jpeg=decode == "tensor-jpeg", draft_size=draft)
    workers = config.workers if batches else 0
    # batch_size=None: each item is a whole LoadedBatch, which the default conversion passes as is
    loader = DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers, pin_memory=on_cuda,
                        prefetch_factor=4 if workers > 0 else None)
    cfg = encoder.preprocess_cfg
    mean_std = (dataset.split[1], dataset.split[2]) if dataset.split else (cfg["mean"], cfg["std"])
    stream = torch.cuda.Stream(device=encoder.device) if on_cuda else None

    encoded = 0
    current: int | None = None
    pieces: list[tuple[np.ndarray, Any]] = []  # (positions, device features) of the current chunk

    def flush(chunk: int) -> None:
        feats = np.zeros((0, dim), out_dtype)
        if pieces:  # the only host-device synchronisation of the run
            order = np.argsort(np.concatenate([p for p, _ in pieces]), kind="stable")
            feats = torch.cat([f for _, f in pieces]).float().cpu().numpy()[order].astype(out_dtype)
        chunk_feats[chunk] = feats
        if work_dir is not None:
            save_npy(work_dir / _part_name(chunk), feats)
            done[str(chunk)] = {"count": int(feats.shape[0]), "skipped": sorted(chunk_skipped.get(chunk, []))}
            write_json(work_dir / PROGRESS_FILE, progress)  # ``done`` is ``progress["done"]``
        pieces.clear()
        if on_chunk is not None:
            on_chunk(chunk)

    def consume(prepared: _Prepared) -> None:
        nonlocal current, encoded
        positions = prepared.positions + [p for p, _ in prepared.bad]
        chunk = min(positions) // chunk_size
        if current is not None and chunk != current:
            flush(current)
        current = chunk
        if prepared.bad and not config.skip_bad_images:
            position, message = min(prepared.bad)
            raise DataError(f"{message} (use --skip-bad-images to leave such images out)")
        for position, _ in prepared.bad:
            chunk_skipped.setdefault(chunk, []).append(position)
        if prepared.images is not None:
            if prepared.ready is not None:  # the encoding stream waits for the side stream (no host sync)
                encoding_stream = torch.cuda.current_stream(encoder.device)
                encoding_stream.wait_event(prepared.ready)
                prepared.images.record_stream(encoding_stream)
            feats = encoder.encode_images(prepared.images, normalize=config.normalize)
            pieces.append((np.asarray(prepared.positions, dtype=np.int64), feats))
        encoded += len(positions)
        if reporter is not None:
            reporter.advance(len(positions))

    threads = max(1, available_cores() - workers) if workers > 0 and not on_cuda else None
    with _cpu_threads(threads):
        waiting: _Prepared | None = None
        for loaded in loader:
            if waiting is not None:
                consume(waiting)  # queued on the device; the next batch is decoded meanwhile
            waiting = _prepare(loaded, encoder, paths, mean_std, stream)
        if waiting is not None:
            consume(waiting)
    if current is not None:
        flush(current)

    skipped = sorted(p for bad in chunk_skipped.values() for p in bad)
    features = []
    for c in range(n_chunks):
        feats = chunk_feats[c] if c in chunk_feats else np.load(work_dir / _part_name(c), allow_pickle=False)
        expected = min(n, (c + 1) * chunk_size) - c * chunk_size - len(chunk_skipped.get(c, []))
        if feats.shape[0] != expected:
            raise DataError(f"{work_dir / _part_name(c)}: holds {feats.shape[0]} features, expected {expected}")
        features.append(feats)
    return EmbedResult(
        features=np.concatenate(features) if features else np.zeros((0, dim), out_dtype),
        positions=np.setdiff1d(np.arange(n, dtype=np.int64), skipped),
        skipped=skipped,
        encoded=encoded,
    )
