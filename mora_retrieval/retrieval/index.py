"""Index folders: a FAISS index with its items table, embeddings and manifest.

Layout of ``indexes/<name>/``::

    manifest.json     architecture, weights fingerprint, model source, preprocessing (with
                      the decode path: pil, tensor-jpeg or pil-draft), encoder dtype, dim,
                      metric, count, FAISS factory string + search parameters, toolkit
                      version, creation time, collection description, skipped images
    index.faiss       the FAISS index (faiss.write_index), inner-product metric
    items.jsonl       one JSON object per row: row, path, image_id, categories, primary_category
    embeddings.npy    the L2-normalised embeddings as float16 [count, dim] (the index is built
                      from exactly these values, so it can be rebuilt without re-encoding)

Index types are FAISS factory strings (``Flat``, ``IVF1024,Flat``, ``HNSW32``,
``IVF4096,PQ64``, ``IVF16384_HNSW32,Flat``, ...) with the inner-product metric, so scores are
cosine similarities. ``auto`` (:func:`choose_index_type`) picks by collection size:

* fewer than 100,000 vectors: ``Flat`` (exact search);
* up to 2,000,000: ``IVF{nlist},Flat`` with ``nlist`` the power of two nearest ``4·sqrt(n)``;
* more: ``IVF{nlist}_HNSW32,Flat`` (an HNSW coarse quantizer), ``nlist`` nearest ``8·sqrt(n)``.

Search parameters (a ``faiss.ParameterSpace`` string stored in the manifest and applied on
load): IVF ``nprobe = max(16, nlist/16)``; HNSW ``efSearch = 128``; an HNSW quantizer gets
``quantizer_efSearch = 2·nprobe``. IVF and PQ are trained on a random sample of at most
``256·nlist`` vectors (seed 0).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

import mora_retrieval
from ..errors import IndexFolderError, MoraError
from ..fileio import atomic_write, make_dirs, read_json, write_json
from .items import Item

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
FORMAT_NAME = "mora-retrieval-index"
FORMAT_VERSION = 1
EXACT_LIMIT = 100_000
IVF_FLAT_LIMIT = 2_000_000
REQUIRED_MANIFEST_KEYS = ("format", "arch", "fingerprint", "source", "dim", "metric", "count", "index_type")
#: What ``encoder_info`` holds; ``encoder_dtype`` (and ``preprocess.decode``) are absent from older manifests.
ENCODER_KEYS = ("arch", "fingerprint", "source", "preprocess", "encoder_dtype")


@dataclass
class IndexFolder:
    """A loaded, validated index folder."""

    path: Path
    manifest: dict[str, Any]
    items: list[Item]
    embeddings: np.ndarray  # float16 [count, dim], memory-mapped
    index: Any = None  # faiss.Index; None when loaded with ``load_index=False``
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # e.g. GPU copies

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS factory string and the search parameters to apply after loading."""

    factory: str
    search_params: str = ""


def _pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(x, 1.0))))


def _ivf_lists(factory: str) -> int | None:
    """``nlist`` of an IVF factory string, ``None`` for other index types."""
    ivf = re.search(r"IVF(\d+)", factory)
    return int(ivf.group(1)) if ivf else None


def default_search_params(factory: str) -> str:
    """Sensible ``nprobe``/``efSearch`` for a factory string (see the module docstring)."""
    nlist = _ivf_lists(factory)
    if nlist:
        nprobe = max(16, nlist // 16)
        quantizer = f",quantizer_efSearch={2 * nprobe}" if re.search(r"IVF\d+_HNSW", factory) else ""
        return f"nprobe={nprobe}{quantizer}"
    return "efSearch=128" if "HNSW" in factory else ""


def choose_index_type(count: int) -> IndexSpec:
    """The ``auto`` rule: exact below 100k vectors, IVF up to 2M, IVF with HNSW quantizer above."""
    if count < EXACT_LIMIT:
        factory = "Flat"
    elif count <= IVF_FLAT_LIMIT:
        factory = f"IVF{_pow2(4 * math.sqrt(count))},Flat"
    else:
        factory = f"IVF{_pow2(8 * math.sqrt(count))}_HNSW32,Flat"
    return IndexSpec(factory, default_search_params(factory))


def resolve_index_type(index_type: str, count: int, search_params: str | None = None) -> IndexSpec:
    """``auto`` or a factory string, with explicit search parameters taking precedence."""
    factory = choose_index_type(count).factory if index_type in ("", "auto") else index_type
    return IndexSpec(factory, default_search_params(factory) if search_params is None else search_params)


def apply_search_params(index: Any, params: str, where: str = "index") -> None:
    """Set ``nprobe``/``efSearch``/... from a ParameterSpace string."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        raise IndexFolderError(f"{where}: bad search parameters '{params}' ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "error" in line.lower():
            return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)[:200]
    return (lines[0] if lines else exc.__class__.__name__)[:200]


def check_index_spec(spec: IndexSpec, count: int, dim: int) -> Any:
    """The empty inner-product index of ``spec``; a bad factory string, or too few vectors to
    train it, fails in one line."""
    try:
        index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise IndexFolderError(f"'{spec.factory}': not a valid FAISS factory string ({_first_line(exc)})") from None
    nlist = _ivf_lists(spec.factory)
    if nlist and count < nlist:
        raise IndexFolderError(f"'{spec.factory}': needs at least {nlist} vectors to train, the collection has {count}")
    return index


def build_faiss_index(embeddings: np.ndarray, spec: IndexSpec) -> Any:
    """The inner-product FAISS index of ``spec`` over ``embeddings``, trained as the module docstring says."""
    total = int(embeddings.shape[0])
    if total == 0:
        raise IndexFolderError("cannot build an index over zero images")
    index = check_index_spec(spec, total, int(embeddings.shape[1]))
    if not index.is_trained:
        n_train = min(total, 256 * (_ivf_lists(spec.factory) or 256))
        chosen = np.sort(np.random.default_rng(0).choice(total, size=n_train, replace=False))
        try:
            index.train(np.ascontiguousarray(embeddings[chosen], dtype=np.float32))
        except RuntimeError as exc:
            raise IndexFolderError(f"'{spec.factory}': training failed on {n_train} vectors ({_first_line(exc)})") from None
    for start in range(0, total, 65536):
        index.add(np.ascontiguousarray(embeddings[start : start + 65536], dtype=np.float32))
    apply_search_params(index, spec.search_params, spec.factory)
    return index


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` (no pickles) through an atomic write."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_items(path: Path, items: Sequence[Item]) -> None:
    """Write the items table (one JSON object per line), atomically."""
    with atomic_write(path, "w") as handle:
        for row, item in enumerate(items):
            handle.write(json.dumps(item.to_row(row)) + "\n")


def read_items(path: Path) -> list[Item]:
    """Read an items table; a missing or malformed file is a one-line IndexFolderError."""
    if not path.is_file():
        raise IndexFolderError(f"{path}: items table not found (is this an index folder?)")
    items = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if data["row"] != len(items):
                    raise ValueError(f"row {data['row']} out of order")
                items.append(Item.from_row(data))
            except (ValueError, KeyError, TypeError) as exc:
                raise IndexFolderError(f"{path}:{lineno}: malformed items row ({exc.__class__.__name__}: {exc})") from None
    return items


def write_index_folder(
    path: str | Path,
    embeddings: np.ndarray,
    items: Sequence[Item],
    *,
    spec: IndexSpec,
    encoder_info: dict[str, Any],
    collection: dict[str, Any] | None = None,
    skipped: Sequence[str] = (),
) -> IndexFolder:
    """Build the index over ``embeddings`` and write a complete index folder (the manifest last, so a
    folder with a manifest is complete); ``encoder_info`` may hold other keys than :data:`ENCODER_KEYS`."""
    path = make_dirs(path, "index folder")
    embeddings = np.asarray(embeddings, dtype=np.float16)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(items):
        raise IndexFolderError(f"{path}: {embeddings.shape[0]} embeddings for {len(items)} items")
    index = build_faiss_index(embeddings, spec)
    manifest_path = path / MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    save_npy(path / EMBEDDINGS_FILE, embeddings)
    write_items(path / ITEMS_FILE, items)
    with atomic_write(path / INDEX_FILE, "wb") as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "toolkit_version": mora_retrieval.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "preprocess": {},
        **{key: encoder_info[key] for key in ENCODER_KEYS if key in encoder_info},
        "dim": int(embeddings.shape[1]),
        "metric": "inner_product",
        "count": int(embeddings.shape[0]),
        "index_type": spec.factory,
        "search_params": spec.search_params,
        "embeddings_dtype": "float16",
        "collection": collection or {},
        "skipped": list(skipped),
    }
    write_json(manifest_path, manifest)
    return IndexFolder(path=path, manifest=manifest, items=list(items), embeddings=embeddings, index=index)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, checked for the required keys."""
    path = Path(path)
    if not path.is_dir():
        raise IndexFolderError(f"{path}: index folder not found")
    try:
        manifest = read_json(path / MANIFEST_FILE, "index manifest")
    except MoraError as exc:
        raise IndexFolderError(f"{exc} (an incomplete or damaged index folder: rebuild it with `mora-ret index`)") from None
    missing = [k for k in REQUIRED_MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing or manifest.get("format") != FORMAT_NAME:
        raise IndexFolderError(f"{path / MANIFEST_FILE}: not a mora-retrieval index manifest (missing {', '.join(missing) or 'format'})")
    return manifest


def load_embeddings(path: Path) -> np.ndarray:
    """Memory-map ``embeddings.npy``; missing or corrupt files give one line."""
    if not path.is_file():
        raise IndexFolderError(f"{path}: embeddings file not found")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IndexFolderError(f"{path}: corrupt embeddings file ({exc.__class__.__name__}: {_first_line(exc)})") from None
    if array.ndim != 2:
        raise IndexFolderError(f"{path}: expected a 2-D embeddings array, found shape {array.shape}")
    return array


def load_index_folder(path: str | Path, load_index: bool = True) -> IndexFolder:
    """Load and cross-check an index folder: every file present, counts and dims agree."""
    path = Path(path)
    manifest = read_manifest(path)
    count, dim = int(manifest["count"]), int(manifest["dim"])
    items = read_items(path / ITEMS_FILE)
    embeddings = load_embeddings(path / EMBEDDINGS_FILE)
    if len(items) != count:
        raise IndexFolderError(f"{path / ITEMS_FILE}: {len(items)} rows, but the manifest says {count}")
    if embeddings.shape != (count, dim):
        raise IndexFolderError(f"{path / EMBEDDINGS_FILE}: shape {tuple(embeddings.shape)}, the manifest says ({count}, {dim})")
    index = None
    if load_index:
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise IndexFolderError(f"{index_file}: FAISS index file not found")
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as exc:
            raise IndexFolderError(f"{index_file}: corrupt or unreadable FAISS index ({_first_line(exc)})") from None
        if index.ntotal != count or index.d != dim:
            raise IndexFolderError(
                f"{index_file}: holds {index.ntotal} vectors of dim {index.d}, the manifest says {count} of dim {dim}"
            )
        apply_search_params(index, manifest.get("search_params", ""), str(path / MANIFEST_FILE))
    return IndexFolder(path=path, manifest=manifest, items=items, embeddings=embeddings, index=index)


def rebuild_index(path: str | Path, index_type: str = "auto", search_params: str | None = None) -> IndexFolder:
    """Rebuild ``index.faiss`` of a folder from its stored embeddings (no re-encoding)."""
    folder = load_index_folder(path, load_index=False)
    spec = resolve_index_type(index_type, folder.count, search_params)
    return write_index_folder(folder.path, np.array(folder.embeddings), folder.items, spec=spec,
                              encoder_info=folder.manifest, collection=folder.manifest.get("collection"),
                              skipped=folder.manifest.get("skipped", ()))
