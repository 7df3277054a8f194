"""Atomic file writes and safe (non-pickle) tensor I/O.

Every file the toolkit writes goes through :func:`atomic_write` (a temporary file in the same folder,
fsynced and renamed over the target), so a crash or Ctrl-C never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors import safe_open
from safetensors.torch import save

from .errors import MoraError


def check_can_create(path: str | os.PathLike, what: str = "folder") -> Path:
    """Raise a one-line MoraError when a file stands where the folder ``path`` (or a parent) goes."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == path else f"is a file, so {path} cannot be created"
                raise MoraError(f"{place}: {where} (expected a {what})")
            break
    return path


def make_dirs(path: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p path``; a file in the way raises a one-line MoraError naming it."""
    check_can_create(path, what).mkdir(parents=True, exist_ok=True)
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it over ``path``. A folder at ``path``,
    or a file where a parent folder should be, raises a one-line MoraError before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise MoraError(f"{path}: is a folder (expected a file name to write)")
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


def write_png(figure: Any, path: str | os.PathLike) -> Path:
    """Render a matplotlib ``Figure`` as PNG into ``path``, atomically; return the path."""
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png")
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "JSON file", error: type[MoraError] = MoraError) -> Any:
    """Read JSON; a missing or malformed file raises ``error`` (a :class:`MoraError`) with one line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not a valid {what} ({exc.__class__.__name__}: {exc})") from None


def read_matching_json(path: str | os.PathLike, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON object in ``path`` if it is there, parses, and holds every key of ``expected`` with
    its value (a resume record of the same work); otherwise None."""
    try:
        recorded = read_json(path)
    except MoraError:
        return None
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return None
    return recorded


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a flat ``{name: tensor}`` dict as safetensors, atomically."""
    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_write(path, "wb") as handle:
        handle.write(payload)


def load_tensors(path: str | os.PathLike, what: str = "safetensors file", error: type[MoraError] = MoraError) -> dict:
    """Load a safetensors file (never unpickles); corrupt or missing files raise ``error`` with one line."""
    return load_tensors_and_metadata(path, what, error)[0]


def load_tensors_and_metadata(
    path: str | os.PathLike, what: str = "safetensors file", error: type[MoraError] = MoraError
) -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file in one read; errors as :func:`load_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for damaged headers/payloads
        raise error(f"{path}: corrupted or unreadable {what} ({exc})") from None
