"""The prepared-image cache: decode and preprocess a split's images once, read pixels every epoch.

One cache holds one split's images at one input size after the PIL part of the model's
preprocessing (:func:`.images.make_uint8_transform`): uint8 ``[N, 3, H, W]`` in one ``.npy`` file,
opened memory-mapped; :func:`normalize_uint8` finishes a batch on the training device.

Beside the data file ``<name>-<H>x<W>.npy`` a JSON sidecar ``<name>-<H>x<W>.json`` records the
preprocessing, the image list (names, sizes, modification times), the Pillow version, the data
file's size and time, and the bad images. A cache is used only when all of these match today's;
otherwise it is rebuilt, or refused with one line naming the file and what differs.

A build writes ``<file>.partial`` chunk by chunk (each decoded by a DataLoader worker) and records
its progress in ``<name>-<H>x<W>.partial.json``. The data file is renamed into place and the
sidecar written last, so a killed build never leaves a cache that validates, and the next build
resumes after the last recorded chunk. Concurrent builders (e.g. several ranks) take turns on a
lock file.

Bad images stop the build with a one-line DataError, or with ``skip_bad_images`` are zeros in a
row marked not ok (a warning is logged), which the dataset view returns as ``None``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader, Dataset

from ..device import default_workers
from ..errors import DataError
from ..fileio import atomic_write, read_json, read_matching_json
from .images import PreprocessSpec, load_batch, make_uint8_transform, normalize_uint8, require_files

try:  # POSIX file locks; elsewhere concurrent builders are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
PREPARED_DIR = "prepared"
#: What decodes and resamples the pixels; another version may give other pixels.
DECODER = {"pillow": PIL.__version__}
Progress = Callable[[int, int], None]

_log = logging.getLogger(__name__)


def _existing(path: Path) -> Path:
    """``path``, or if absent its nearest existing parent."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def default_prepared_dir(data_root: str | os.PathLike) -> Path:
    """``<data_root>/prepared`` if it can be written, else a per-root folder in the user cache
    (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``mora-retrieval/prepared/<root name>-<hash>``).
    Creates nothing."""
    root = Path(data_root).resolve()
    writable = _existing(root / PREPARED_DIR)
    if writable.is_dir() and os.access(writable, os.W_OK | os.X_OK):
        return root / PREPARED_DIR
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return cache / "mora-retrieval" / PREPARED_DIR / f"{root.name}-{digest}"


def prepared_path(directory: str | os.PathLike, name: str, spec: PreprocessSpec) -> Path:
    """``<directory>/<name>-<H>x<W>.npy``: one file per split (``name``, e.g. ``cirr-train``)
    and input size. Another preprocessing at the same size replaces the file's content."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Path(directory) / f"{safe}-{spec.size[0]}x{spec.size[1]}.npy"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _progress_file(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.json")


@dataclass(frozen=True)
class ImageList:
    """The images of a cache, in row order: unique names, their files, sizes and times."""

    names: tuple[str, ...]
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes_ns: tuple[int, ...]

    @classmethod
    def stat(cls, paths: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> "ImageList":
        """Stat every file (a missing one is a DataError naming it); names default to the paths."""
        paths = [str(p) for p in paths]
        names = list(paths) if names is None else [str(n) for n in names]
        if len(names) != len(paths):
            raise DataError(f"prepared images: {len(names)} names for {len(paths)} image files")
        if len(set(names)) != len(names):
            dup = next(n for n, count in Counter(names).items() if count > 1)
            raise DataError(f"prepared images: image name {dup!r} appears more than once (names must be unique)")
        require_files(paths)
        stats = [os.stat(path) for path in paths]
        return cls(tuple(names), tuple(paths), tuple(st.st_size for st in stats), tuple(st.st_mtime_ns for st in stats))

    def __len__(self) -> int:
        return len(self.names)

    def key(self) -> str:
        """SHA-256 over the names, sizes and modification times (not the folder they live in)."""
        record = json.dumps([self.names, self.sizes, self.mtimes_ns], separators=(",", ":"))
        return hashlib.sha256(record.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self), "key": self.key(), "names": list(self.names), "sizes": list(self.sizes),
                "mtimes_ns": list(self.mtimes_ns)}

    def difference(self, recorded: dict[str, Any]) -> str:
        """What differs from a recorded :meth:`to_dict`, in a few words."""
        old_names = list(recorded.get("names", []))
        if old_names != list(self.names):
            old, new = set(old_names), set(self.names)
            added, removed = [n for n in self.names if n not in old], [n for n in old_names if n not in new]
            if not added and not removed:
                return "the images are listed in another order"
            parts = [f"{len(added)} added (first: {added[0]})"] if added else []
            parts += [f"{len(removed)} removed (first: {removed[0]})"] if removed else []
            return "the image list differs: " + ", ".join(parts)
        stats = list(zip(recorded.get("sizes", []), recorded.get("mtimes_ns", [])))
        changed = [i for i, old in enumerate(stats) if tuple(old) != (self.sizes[i], self.mtimes_ns[i])]
        if changed:
            return f"{len(changed)} image file(s) changed since the build (first: {self.paths[changed[0]]})"
        return "the image list's record does not match its hash"


def _spec_difference(spec: PreprocessSpec, recorded: Any) -> str:
    try:
        old = PreprocessSpec.from_dict(recorded).to_dict()
    except (TypeError, DataError):
        return "the preprocessing differs"
    fields = [k for k, v in spec.to_dict().items() if old.get(k) != v]
    return f"the preprocessing differs ({', '.join(fields) or 'its hash'})"


def _write_compact_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as one-line JSON (the per-image lists stay one line each)."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, separators=(",", ":"))
        handle.write("\n")


def _file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def stale_reason(path: str | os.PathLike, images: ImageList, spec: PreprocessSpec) -> str | None:
    """Why the cache at ``path`` cannot serve ``images`` under ``spec``, or None if it can."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        progress = _progress_file(path)
        if progress.is_file() and _partial(path).is_file():
            return f"its build did not finish ({progress.name} records the progress)"
        return f"it has not been built ({sidecar.name} not found)"
    try:
        meta = read_json(sidecar, "prepared-image sidecar", error=DataError)
    except DataError as exc:
        return str(exc)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return f"{sidecar.name} is not a prepared-image sidecar of format {FORMAT_VERSION}"
    if not path.is_file():
        return f"its data file {path.name} is missing"
    if meta.get("data") != _file_stat(path):
        return f"its data file {path.name} changed after the build"
    if meta.get("preprocess_key") != spec.key():
        return _spec_difference(spec, meta.get("preprocess"))
    if meta.get("decoder") != DECODER:
        return f"it was decoded with {meta.get('decoder')}, this environment has {DECODER}"
    recorded = meta.get("images") if isinstance(meta.get("images"), dict) else {}
    if recorded.get("key") != images.key():
        return images.difference(recorded)
    if meta.get("shape") != [len(images), 3, *spec.size]:
        return f"its shape {meta.get('shape')} is not {[len(images), 3, *spec.size]}"
    return None


class PreparedImages:
    """An opened, validated cache: memory-mapped uint8 ``pixels``, the image ``names``, the per-image
    ``ok`` mask and the ``spec``. Pickles without its pixels (DataLoader workers map the file again)."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.names: list[str] = list(meta["images"]["names"])
        bad = meta.get("bad", {})
        self.ok = np.ones(len(self.names), dtype=bool)
        self.ok[np.asarray(bad.get("rows", []), dtype=np.int64)] = False
        self.bad: list[tuple[str, str]] = [(self.names[r], why) for r, why in zip(bad.get("rows", []), bad.get("reasons", []))]
        self._shape = tuple(meta["shape"])

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """The memory-mapped uint8 array ``[N, 3, H, W]``."""
        try:
            pixels = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: unreadable prepared-image file ({exc})") from None
        if pixels.dtype != np.uint8 or pixels.shape != self._shape:
            raise DataError(f"{self.path}: holds {pixels.dtype} {list(pixels.shape)}, its sidecar says uint8 "
                            f"{list(self._shape)}")
        return pixels

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "pixels"}

    @functools.cached_property
    def _rows(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def row(self, name: str) -> int:
        """The row of the image called ``name`` (a DataError if there is none)."""
        try:
            return self._rows[name]
        except KeyError:
            raise DataError(f"{self.path}: no image named {name!r} in the prepared images") from None

    def batch(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images as one uint8 ``[B, 3, H, W]`` tensor, read in one gather (a copy out of the map)."""
        return torch.from_numpy(self.pixels[np.asarray(rows, dtype=np.int64)])

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> torch.Tensor:
        """:func:`normalize_uint8` with this cache's mean and std."""
        return normalize_uint8(batch, self.spec.mean, self.spec.std, dtype=dtype, device=device)


class PreparedImageDataset(Dataset):
    """A Dataset over a cache's rows (all, or ``rows``): uint8 ``[3, H, W]`` items, ``None`` for a bad
    image; batched fetches (``__getitems__``) read the map once per batch."""

    def __init__(self, prepared: PreparedImages, rows: Sequence[int] | None = None) -> None:
        self.prepared = prepared
        self.rows = np.arange(len(prepared)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor | None]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        images = self.prepared.batch(rows)
        return [image if ok else None for image, ok in zip(images, self.prepared.ok[rows])]


def open_prepared(path: str | os.PathLike, images: ImageList, spec: PreprocessSpec,
                  skip_bad_images: bool = False) -> PreparedImages:
    """Open the cache at ``path`` if it serves ``images`` under ``spec``; else one DataError
    naming the file and what differs."""
    path = Path(path)
    reason = stale_reason(path, images, spec)
    if reason is not None:
        raise DataError(f"{path}: prepared-image cache cannot be used: {reason}")
    prepared = PreparedImages(path, read_json(_sidecar(path), "prepared-image sidecar", error=DataError))
    prepared.pixels  # noqa: B018 - map the file now, so a damaged one fails here
    if prepared.bad:
        name, reason = prepared.bad[0]
        if not skip_bad_images:
            raise DataError(f"{reason} [{len(prepared.bad)} bad image(s) recorded in {_sidecar(path)}; fix them or "
                            f"skip bad images]")
        _log.warning("%s: %d bad image(s) skipped, their rows are not ok (first: %s)", path, len(prepared.bad), reason)
    return prepared


class _ChunkDecoder(Dataset):
    """Item k: the images of chunk k decoded into ONE uint8 ``[b, 3, H, W]`` tensor, plus
    ``(offset in chunk, reason)`` for those that did not decode (left as zeros)."""

    def __init__(self, paths: Sequence[str], spec: PreprocessSpec, start: int, chunk: int) -> None:
        self.paths, self.spec, self.start, self.chunk = list(paths), spec, start, chunk
        self.transform = make_uint8_transform(spec)

    def __len__(self) -> int:
        return max(0, -(-(len(self.paths) - self.start) // self.chunk))

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, list[tuple[int, str]]]:
        first = self.start + k * self.chunk
        paths = self.paths[first:first + self.chunk]
        pixels, bad = load_batch(paths, self.transform)
        if pixels is None:  # not one image of the chunk decodes
            pixels = torch.zeros((len(paths), 3, *self.spec.size), dtype=torch.uint8)
        return first, pixels, bad


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # closing the file releases the lock
        yield


def _resume_state(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded progress of an unfinished build of the same cache, if its data file is there."""
    progress, partial = _progress_file(path), _partial(path)
    if not (progress.is_file() and partial.is_file()):
        return None
    recorded = read_matching_json(progress, state)
    if recorded is None:
        return None
    try:
        pixels = np.load(partial, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if list(pixels.shape) != state["shape"] or pixels.dtype != np.uint8:
        return None
    return recorded


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _check_space(path: Path, needed: int) -> None:
    """Raise unless the disk has room for ``needed`` bytes (counting the files a build replaces)."""
    reclaimable = sum(p.stat().st_size for p in (path, _partial(path)) if p.is_file())
    free = shutil.disk_usage(_existing(path.parent)).free + reclaimable
    if free < needed:
        raise DataError(f"{path}: the prepared images need {_human(needed)}, only {_human(free)} are free there "
                        f"(choose another location)")


def _build(path: Path, images: ImageList, spec: PreprocessSpec, skip_bad_images: bool, workers: int,
           chunk: int, progress: Progress | None) -> None:
    """Build (or resume building) the cache at ``path``."""
    shape = [len(images), 3, *spec.size]
    state = {"format": FORMAT_VERSION, "shape": shape, "preprocess_key": spec.key(), "images_key": images.key(),
             "decoder": DECODER}
    _discard(_sidecar(path), path)  # from here on, no cache at this path validates until the end
    partial, progress_file = _partial(path), _progress_file(path)
    recorded = _resume_state(path, state)
    if recorded is None:
        _discard(partial, progress_file)
        pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=tuple(shape))
        done, bad_rows, bad_reasons = 0, [], []
    else:
        pixels = np.load(partial, mmap_mode="r+", allow_pickle=False)
        done, bad_rows, bad_reasons = int(recorded["done"]), list(recorded["bad_rows"]), list(recorded["bad_reasons"])
        _log.info("%s: resuming an unfinished build at image %d of %d", path, done, len(images))
    loader = DataLoader(_ChunkDecoder(images.paths, spec, done, chunk), batch_size=None, num_workers=workers,
                        prefetch_factor=2 if workers > 0 else None)
    if progress is not None:
        progress(done, len(images))
    for first, batch, bad in loader:
        if bad and not skip_bad_images:
            raise DataError(bad[0][1])
        pixels[first:first + len(batch)] = batch.numpy()
        bad_rows += [first + j for j, _ in bad]
        bad_reasons += [why for _, why in bad]
        pixels.flush()
        done = first + len(batch)
        _write_compact_json(progress_file, {**state, "done": done, "bad_rows": bad_rows, "bad_reasons": bad_reasons})
        if progress is not None:
            progress(done, len(images))
    pixels.flush()
    del pixels
    os.replace(partial, path)
    meta = {"format": FORMAT_VERSION, "shape": shape, "dtype": "uint8", "preprocess": spec.to_dict(),
            "preprocess_key": spec.key(), "decoder": DECODER, "images": images.to_dict(),
            "bad": {"count": len(bad_rows), "rows": bad_rows, "reasons": bad_reasons}, "data": _file_stat(path)}
    _write_compact_json(_sidecar(path), meta)
    _discard(progress_file)


def prepare_images(paths: Sequence[str | os.PathLike], spec: PreprocessSpec, path: str | os.PathLike, *,
                   names: Sequence[str] | None = None, skip_bad_images: bool = False, rebuild: bool = True,
                   workers: int | None = None, chunk: int = 64, progress: Progress | None = None) -> PreparedImages:
    """The cache at ``path`` (see :func:`prepared_path`) for these images under ``spec``: opened if it
    is valid, else built (``rebuild=True``) or refused with a DataError.

    ``names`` (unique; default: the paths) name the rows for :meth:`PreparedImages.row`. ``workers``
    DataLoader workers decode ``chunk`` images each; ``progress(done, total)`` follows each chunk.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise DataError(f"{path}: a prepared-image cache is a .npy file")
    if chunk < 1:
        raise DataError(f"prepared images: chunk must be at least 1, got {chunk}")
    images = ImageList.stat(paths, names)
    if not len(images):
        raise DataError(f"{path}: no images to prepare")
    reason = stale_reason(path, images, spec)
    if reason is not None and not rebuild:
        raise DataError(f"{path}: prepared-image cache cannot be used: {reason} (allow a rebuild, or delete it)")
    if reason is not None:
        _check_space(path, len(images) * 3 * spec.size[0] * spec.size[1])
        with _build_lock(path):
            reason = stale_reason(path, images, spec)  # another process may have built it meanwhile
            if reason is not None:
                _log.info("%s: preparing %d images (%s)", path, len(images), reason)
                _build(path, images, spec, skip_bad_images, default_workers() if workers is None else workers, chunk,
                       progress)
    return open_prepared(path, images, spec, skip_bad_images)
