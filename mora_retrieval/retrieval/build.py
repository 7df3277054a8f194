"""From a collection of images to an index folder, in one process or in shards.

Single process: embeddings are computed into ``<out>/shards/`` (resumable chunks, see
:mod:`.embed`), then the index folder is written and the chunk files removed.

Sharded (``shard=(i, n)``, or automatically from torchrun's ``RANK``/``WORLD_SIZE``): process
``i`` takes the contiguous block ``[i·N/n, (i+1)·N/n)`` of the item list and writes a *part*
to ``<out>/parts/<i>-of-<n>/`` (``embeddings.npy``, ``items.jsonl``, ``part.json``; its
resumable chunks live in ``chunks/`` until the part is complete). Whichever process finds all
``n`` parts complete merges them (:func:`merge_parts`, also ``mora-ret index merge``): the
index is trained on a sample drawn across parts and the parts are added in order, so the
rows are those of a single-process run. Parts are kept after merging (delete ``parts/`` to
reclaim the space, or keep it to merge again with another ``--index-type``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import IndexFolderError, MoraError
from ..fileio import check_can_create, read_json, write_json
from ..progress import ProgressBar
from .embed import EmbedConfig, decode_path, embed_paths
from .index import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    ITEMS_FILE,
    IndexFolder,
    check_index_spec,
    load_embeddings,
    read_manifest,
    read_items,
    resolve_index_type,
    save_npy,
    write_index_folder,
    write_items,
)
from .items import Item, items_digest

WORK_DIR = "shards"
PARTS_DIR = "parts"
PART_FILE = "part.json"


@dataclass
class BuildConfig:
    """What to build: index type and sharding, plus the embedding pipeline settings."""

    index_type: str = "auto"
    search_params: str | None = None
    shard: tuple[int, int] | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    overwrite: bool = False  # replace a finished index built with another model


@dataclass
class BuildResult:
    """What a call did: the folder (``None`` for a part awaiting its siblings), counts."""

    folder: IndexFolder | None
    encoded: int
    skipped: list[str]
    part_dir: Path | None = None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)``; ``None`` → from torchrun's RANK/WORLD_SIZE when set."""
    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MoraError(f"--shard '{text}': expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise MoraError(f"--shard '{text}': expected 0 <= i < n")
    return i, n


def encoder_info(encoder: Any, embed: EmbedConfig) -> dict[str, Any]:
    """The manifest fields that describe the model, its dtype and the decoding used."""
    return {
        "arch": encoder.source.get("arch"),
        "fingerprint": encoder.fingerprint,
        "source": encoder.source,
        "preprocess": {**encoder.preprocess_cfg, "fast_jpeg": bool(embed.fast_jpeg),
                       "decode": decode_path(embed, encoder.device, encoder.preprocess_cfg)},
        "encoder_dtype": str(encoder.dtype).removeprefix("torch."),
    }


def _check_finite(features: np.ndarray, items: Sequence[Item], out: Path) -> None:
    """Refuse NaN/inf embeddings (e.g. weights that diverged): an index of them finds nothing."""
    bad = ~np.isfinite(np.asarray(features, dtype=np.float32)).all(axis=1)
    if bad.any():
        first = items[int(np.flatnonzero(bad)[0])].path
        raise IndexFolderError(f"{out}: {int(bad.sum())} of {len(bad)} embeddings are NaN or inf (first: {first}); "
                          f"the model's weights are not finite, so nothing was written")


def check_output_folder(out: Path, fingerprint: str, overwrite: bool = False) -> None:
    """Refuse, before anything is written, an ``out`` that is a file, or that holds a finished
    index of another model (unless ``overwrite``): re-indexing must never replace it silently."""
    if out.exists() and not out.is_dir():
        raise IndexFolderError(f"{out}: exists and is not a folder (expected the index folder to create)")
    check_can_create(out, "folder for the index")
    manifest = out / MANIFEST_FILE
    if overwrite or not manifest.is_file():
        return
    try:
        old = read_manifest(out).get("fingerprint")
    except MoraError:
        return  # a damaged folder: rebuilding it is what the user wants
    if old != fingerprint:
        raise IndexFolderError(f"{out}: already holds an index of another model (fingerprint {old}, this model "
                          f"{fingerprint}); pass --overwrite to replace it, or choose another --name/--out")


def build_index(
    encoder: Any,
    items: Sequence[Item],
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    collection: dict[str, Any] | None = None,
    reporter: ProgressBar | None = None,
    on_chunk: Any = None,
) -> BuildResult:
    """Embed ``items`` and write the index folder ``out`` (or this process's part of it)."""
    config = config or BuildConfig()
    out = Path(out)
    items = list(items)
    n = len(items)
    if not items:
        raise IndexFolderError(f"{out}: nothing to index (the collection is empty)")
    check_output_folder(out, encoder.fingerprint, config.overwrite)
    check_index_spec(resolve_index_type(config.index_type, n, config.search_params), n, encoder.dim)
    shard, n_shards = config.shard if config.shard and config.shard[1] > 1 else (0, 1)
    lo, hi = shard * n // n_shards, (shard + 1) * n // n_shards
    part_dir = out / PARTS_DIR / f"{shard}-of-{n_shards}" if n_shards > 1 else None
    work = part_dir / "chunks" if part_dir else out / WORK_DIR
    mine = items[lo:hi]
    result = embed_paths(encoder, [it.path for it in mine], config.embed, work_dir=work, run_key=items_digest(mine),
                         reporter=reporter, on_chunk=on_chunk)
    kept = [mine[p] for p in result.positions]
    skipped = [mine[p].path for p in result.skipped]
    _check_finite(result.features, kept, out)
    info = encoder_info(encoder, config.embed)
    if part_dir is None:
        spec = resolve_index_type(config.index_type, len(kept), config.search_params)
        folder = write_index_folder(out, result.features, kept, spec=spec, collection=collection, skipped=skipped,
                                    encoder_info=info)
        shutil.rmtree(work, ignore_errors=True)
        return BuildResult(folder, result.encoded, skipped)

    (part_dir / PART_FILE).unlink(missing_ok=True)
    save_npy(part_dir / EMBEDDINGS_FILE, result.features)
    write_items(part_dir / ITEMS_FILE, kept)
    write_json(part_dir / PART_FILE, {
        "shard": [shard, n_shards], "rows": [lo, hi], "total_items": n, "items_digest": items_digest(items),
        "count": len(kept), "skipped": skipped, "encoder": info, "collection": collection or {},
    })
    shutil.rmtree(work, ignore_errors=True)
    folder = None
    if all((out / PARTS_DIR / f"{i}-of-{n_shards}" / PART_FILE).is_file() for i in range(n_shards)):
        folder = merge_parts(out, config.index_type, config.search_params)
    return BuildResult(folder, result.encoded, skipped, part_dir)


def _embedding_setup(part: dict[str, Any]) -> str:
    """A part's decode path and encoder dtype (``None`` for parts written before they were recorded)."""
    encoder = part["encoder"]
    return f"decode {encoder.get('preprocess', {}).get('decode')}, dtype {encoder.get('encoder_dtype')}"


def merge_parts(out: str | Path, index_type: str = "auto", search_params: str | None = None) -> IndexFolder:
    """Combine the parts under ``<out>/parts/`` into the index folder ``out``."""
    out = Path(out)
    parts_root = out / PARTS_DIR
    found = sorted(parts_root.glob(f"*-of-*/{PART_FILE}")) if parts_root.is_dir() else []
    if not found:
        raise IndexFolderError(f"{parts_root}: no index parts found (run `mora-ret index ... --shard i/n` first)")
    metas = [read_json(path, "index part description", error=IndexFolderError) for path in found]
    n = int(metas[0]["shard"][1])
    by_index = {int(m["shard"][0]): (m, p.parent) for m, p in zip(metas, found) if int(m["shard"][1]) == n}
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise IndexFolderError(f"{parts_root}: parts {', '.join(f'{i}-of-{n}' for i in missing)} are missing or unfinished")
    first = by_index[0][0]
    embeddings, items, skipped = [], [], []
    for i in range(n):
        meta, part_dir = by_index[i]
        if meta["encoder"]["fingerprint"] != first["encoder"]["fingerprint"]:
            raise IndexFolderError(f"{part_dir / PART_FILE}: embedded with other weights than part 0-of-{n}")
        if meta["items_digest"] != first["items_digest"]:
            raise IndexFolderError(f"{part_dir / PART_FILE}: was cut from another item list than part 0-of-{n}")
        if _embedding_setup(meta) != _embedding_setup(first):  # decoding and dtype change the features slightly
            raise IndexFolderError(f"{part_dir / PART_FILE}: embedded with {_embedding_setup(meta)}, part 0-of-{n} "
                                   f"with {_embedding_setup(first)}; embed every part on the same kind of device "
                                   f"with the same --fast-jpeg")
        emb = load_embeddings(part_dir / EMBEDDINGS_FILE)
        part_items = read_items(part_dir / ITEMS_FILE)
        if emb.shape[0] != len(part_items) or emb.shape[0] != int(meta["count"]):
            raise IndexFolderError(f"{part_dir}: {emb.shape[0]} embeddings, {len(part_items)} items, part.json says {meta['count']}")
        embeddings.append(emb)
        items.extend(part_items)
        skipped.extend(meta.get("skipped", []))
    spec = resolve_index_type(index_type, len(items), search_params)
    return write_index_folder(out, np.concatenate(embeddings), items, spec=spec, encoder_info=first["encoder"],
                              collection=first.get("collection"), skipped=skipped)
