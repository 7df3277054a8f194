"""Queries against an index folder: image, text or composed (image + text).

The query model must be the one the index was built with (:func:`check_encoder`). Search runs on
FAISS (on the GPU when the installed faiss has GPU support). On a CUDA machine without GPU
FAISS, an exact (``Flat``) index is searched with torch (:func:`exact_search`) over the stored
float16 embeddings, which go to the GPU once and stay there.

A query with both parts is composed by ``encoder.encode_composed`` on the raw features; a query
with one part is that part's normalised feature.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import load_image
from ..errors import IndexFolderError, MoraError
from .index import MANIFEST_FILE, IndexFolder
from .items import Item


@dataclass(frozen=True)
class Hit:
    """One result: 1-based rank, similarity score, row in the index and its item."""

    rank: int
    score: float
    row: int
    item: Item

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, "row": self.row, **self.item.to_row(self.row)}


def check_encoder(folder: IndexFolder, encoder: Any) -> None:
    """Refuse an encoder whose weights are not those the index was built with."""
    expected = folder.manifest["fingerprint"]
    if encoder.fingerprint != expected:
        source = folder.manifest.get("source", {})
        hint = "use the same model options"
        if not any(source.get(k) for k in ("pretrained", "checkpoint", "adapter", "run")):
            hint = "it was built with random weights, which cannot be reloaded: rebuild it from a checkpoint file"
        raise IndexFolderError(
            f"{folder.path / MANIFEST_FILE}: index was built with weights {expected} "
            f"({folder.manifest.get('arch')}), the query model has {encoder.fingerprint}; {hint}"
        )
    if encoder.dim != folder.dim:
        raise IndexFolderError(f"{folder.path}: index dimension {folder.dim}, query model gives {encoder.dim}")


SCORE_TILE_BYTES = 1 << 30  # largest query x gallery score tile held at once
RERANK_MARGIN = 32  # extra candidates per query kept from low-precision scores for the float32 re-rank


@dataclass(frozen=True)
class SearchPlan:
    """``query_rows`` queries are scored against ``gallery_rows`` gallery vectors at a time;
    each query keeps ``candidates`` rows (``>= k``) for the final float32 re-ranking."""

    query_rows: int
    gallery_rows: int
    candidates: int

    def query_slices(self, n_queries: int) -> list[slice]:
        return [slice(s, min(n_queries, s + self.query_rows)) for s in range(0, n_queries, self.query_rows)]

    def gallery_slices(self, n_gallery: int) -> list[slice]:
        return [slice(s, min(n_gallery, s + self.gallery_rows)) for s in range(0, n_gallery, self.gallery_rows)]


def plan_exact_search(
    n_queries: int,
    n_gallery: int,
    k: int,
    score_bytes: int,
    budget_bytes: int = SCORE_TILE_BYTES,
) -> SearchPlan:
    """Tile sizes such that ``query_rows * gallery_rows * score_bytes <= budget_bytes``, the whole
    gallery in one tile column where a query row fits (1M float16 scores are 2 MB); lower-precision
    scores keep :data:`RERANK_MARGIN` extra candidates, so that rounding cannot push a true top-k row out."""
    if n_queries < 1 or n_gallery < 1 or k < 1:
        raise ValueError(f"empty search: {n_queries} queries, {n_gallery} gallery rows, k={k}")
    cells = max(1, budget_bytes // max(1, score_bytes))
    gallery_rows = min(n_gallery, cells)
    query_rows = max(1, min(n_queries, cells // gallery_rows))
    k = min(k, n_gallery)
    candidates = k if score_bytes >= 4 else min(n_gallery, k + RERANK_MARGIN)
    return SearchPlan(query_rows, gallery_rows, candidates)


def exact_search(gallery: Any, queries: Any, k: int, plan: SearchPlan | None = None) -> tuple[Any, Any]:
    """Exact inner-product top ``k`` with torch: ``(scores float32 [Q, k], rows int64 [Q, k])``,
    best first, on the device of ``gallery`` and ``queries`` (no host synchronisation).

    Tiles are scored in the gallery's dtype (never a full ``[Q, N]`` float32 matrix); the kept
    candidates are re-scored in float32, so the scores are exact inner products with the stored vectors.
    """
    n, q = int(gallery.shape[0]), int(queries.shape[0])
    k = min(int(k), n)
    plan = plan or plan_exact_search(q, n, k, gallery.element_size())
    low = queries.to(gallery.dtype)
    exact_q = queries.float()
    out_scores, out_rows = [], []
    for qs in plan.query_slices(q):
        best_s = best_r = None
        for gs in plan.gallery_slices(n):
            tile = low[qs] @ gallery[gs].T  # [rows, cols] in the gallery dtype
            s, r = torch.topk(tile, min(plan.candidates, tile.shape[1]), dim=1, sorted=False)
            r = r + gs.start
            if best_s is None:
                best_s, best_r = s, r
            else:
                merged_s, merged_r = torch.cat([best_s, s], dim=1), torch.cat([best_r, r], dim=1)
                best_s, pick = torch.topk(merged_s, min(plan.candidates, merged_s.shape[1]), dim=1, sorted=False)
                best_r = merged_r.gather(1, pick)
        if gallery.dtype == torch.float32 and plan.candidates == k:
            scores = best_s
        else:  # float32 scores of the candidates against the stored values
            scores = torch.bmm(gallery[best_r].float(), exact_q[qs].unsqueeze(2)).squeeze(2)
        top, pick = torch.topk(scores, k, dim=1, sorted=True)
        out_scores.append(top)
        out_rows.append(best_r.gather(1, pick))
    if len(out_scores) == 1:
        return out_scores[0], out_rows[0]
    return torch.cat(out_scores), torch.cat(out_rows)


def device_gallery(folder: IndexFolder, device: str, dtype: Any) -> Any:
    """The folder's stored float16 embeddings as a ``dtype`` tensor on ``device``, made once and cached."""
    key = ("exact_gallery", str(device), str(dtype))
    gallery = folder.cache.get(key)
    if gallery is None:
        stored = torch.from_numpy(np.array(folder.embeddings, copy=True))  # a memory map is read-only
        gallery = folder.cache[key] = stored.to(device=device, dtype=dtype)
    return gallery


def search_exact_torch(folder: IndexFolder, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` over the folder's stored embeddings on ``device`` (float16 on CUDA, float32
    on CPU, where float16 matrix products are slow), results on the host."""
    on_cuda = str(device).startswith("cuda")
    gallery = device_gallery(folder, device, torch.float16 if on_cuda else torch.float32)
    q = torch.from_numpy(queries)
    if on_cuda:
        q = q.pin_memory().to(device, non_blocking=True)
    scores, rows = exact_search(gallery, q, k)
    if on_cuda:  # both copies queued, one wait
        scores, rows = scores.to("cpu", non_blocking=True), rows.to("cpu", non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
    return scores.numpy(), rows.numpy()


def search_vectors(folder: IndexFolder, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the top ``k`` rows for each query (float32 ``[Q, d]``); rows are ``-1``
    (score ``-inf``) where the index returns fewer than ``k`` results."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != folder.dim:
        raise IndexFolderError(f"{folder.path}: queries of shape {queries.shape} do not match index dimension {folder.dim}")
    if int(k) < 1:
        raise IndexFolderError(f"k must be at least 1, got {k}")
    k = min(int(k), folder.count)
    if folder.manifest.get("index_type") == "Flat" and torch.cuda.is_available() and faiss.get_num_gpus() == 0:
        return search_exact_torch(folder, queries, k, "cuda")
    if folder.index is None:
        raise IndexFolderError(f"{folder.path}: index not loaded")
    if faiss.get_num_gpus() > 0 and not folder.cache.get("faiss_on_gpu"):
        with contextlib.suppress(RuntimeError):  # index types without a GPU implementation stay on the CPU
            folder.index = faiss.index_cpu_to_all_gpus(folder.index)
        folder.cache["faiss_on_gpu"] = True
    scores, rows = folder.index.search(queries, k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    return scores, rows.astype(np.int64)


EMPTY_QUERY = "give a query: an image, a text, or both"


@dataclass(frozen=True)
class Query:
    """One query: a decoded RGB image (PIL) and/or a text, how many hits to return, and the
    query image as the JSON shows it (``image_label``: a path or an upload's name)."""

    image: Any = None
    text: str | None = None
    k: int = 10
    image_label: str | None = None


def query_mode(has_image: bool, has_text: bool) -> str:
    """``composed``, ``image`` or ``text``."""
    if has_image and has_text:
        return "composed"
    return "image" if has_image else "text"


def encode_queries(encoder: Any, queries: Sequence[Query]) -> np.ndarray:
    """The ``[len(queries), d]`` float32 query features, one batched forward per modality."""
    if not queries:
        raise MoraError("no queries to encode")
    if any(q.image is None and q.text is None for q in queries):
        raise MoraError(EMPTY_QUERY)
    with_image = [i for i, q in enumerate(queries) if q.image is not None]
    with_text = [i for i, q in enumerate(queries) if q.text is not None]
    image_raw: dict[int, Any] = {}  # query position -> raw feature
    text_raw: dict[int, Any] = {}
    if with_image:
        batch = torch.stack([encoder.preprocess(queries[i].image) for i in with_image])
        image_raw = dict(zip(with_image, encoder.encode_images(batch, normalize=False)))
    if with_text:
        text_raw = dict(zip(with_text, encoder.encode_texts([queries[i].text for i in with_text], normalize=False)))
    composed = [i for i in with_image if i in text_raw]
    out = {i: F.normalize(raw, dim=-1) for i, raw in {**text_raw, **image_raw}.items() if i not in composed}
    if composed:
        out.update(zip(composed, encoder.encode_composed(torch.stack([image_raw[i] for i in composed]),
                                                         torch.stack([text_raw[i] for i in composed]))))
    return torch.stack([out[i] for i in range(len(queries))]).float().cpu().numpy()


def search_many(folder: IndexFolder, encoder: Any, queries: Sequence[Query]) -> list[list[Hit]]:
    """The top ``q.k`` hits of every query (the caller checks the encoder against the index once)."""
    features = encode_queries(encoder, queries)
    scores, rows = search_vectors(folder, features, max(q.k for q in queries))
    return [
        [
            Hit(rank=r + 1, score=float(s), row=int(row), item=folder.items[int(row)])
            for r, (s, row) in enumerate(zip(scores[i][: q.k], rows[i][: q.k]))
            if row >= 0
        ]
        for i, q in enumerate(queries)
    ]


def search(
    folder: IndexFolder, encoder: Any, *, image: str | Path | None = None, text: str | None = None, k: int = 10
) -> list[Hit]:
    """Encode one query (an image file and/or a text) and return its top ``k`` hits."""
    check_encoder(folder, encoder)
    return search_many(folder, encoder, [Query(None if image is None else load_image(image), text, k)])[0]


def search_payload(index: str, encoder: Any, hits: Sequence[Hit], *, image: str | None, text: str | None) -> dict[str, Any]:
    """The JSON object ``mora-ret search --json`` prints (and ``POST /api/search`` returns)."""
    return {
        "index": index,
        "mode": query_mode(image is not None, text is not None),
        "image": image,
        "text": text,
        "composed_with": "combiner" if encoder.combiner is not None else "sum",
        "results": [h.to_json() for h in hits],
    }


def text_is_truncated(tokenizer: Any, text: str) -> bool:
    """Whether ``tokenizer`` cuts ``text`` to its context length (open_clip truncates silently)."""
    context = getattr(tokenizer, "context_length", None)
    encode = getattr(tokenizer, "encode", None)
    if context is None or encode is None:
        return False
    return len(encode(text)) + 2 > int(context)  # + start and end tokens
