"""Image-to-image Recall@K on COCO (docs/protocols.md §5).

Protocol: the gallery is the index (every image of the split with an instance annotation);
each gallery image is also a query and is removed from its own ranking. Relevance between
two images is one of

* ``exact``       – the same set of category ids (the default);
* ``primary``     – the same primary category (largest total annotated area);
* ``any``         – at least one category in common;
* ``jaccard:T``   – Jaccard similarity of the category sets ≥ T.

Queries with no relevant image left in the gallery are left out of the mean and counted.
Recall@K is the percentage of evaluated queries with at least one relevant image in their
top K. The ranking comes from the index itself (approximate indexes are evaluated as built).
Mode ``image`` uses the stored embeddings as queries; mode ``cir`` re-encodes every image,
decoded as the manifest records the gallery was, through the composed-query path with an empty
caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import IndexFolderError, MoraError
from .embed import EmbedConfig, embed_paths
from .index import ITEMS_FILE
from .items import Item
from .search import check_encoder, search_vectors


@dataclass
class RecallResult:
    """Recall@K in percent over the evaluated queries, with the counts behind it."""

    ks: tuple[int, ...]
    hits: dict[int, int]
    evaluated: int
    no_relevant: int

    @property
    def recall(self) -> dict[int, float]:
        return {k: (100.0 * self.hits[k] / self.evaluated if self.evaluated else float("nan")) for k in self.ks}

    def __add__(self, other: "RecallResult") -> "RecallResult":
        return RecallResult(
            self.ks, {k: self.hits[k] + other.hits[k] for k in self.ks},
            self.evaluated + other.evaluated, self.no_relevant + other.no_relevant,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "recall": {f"R@{k}": self.recall[k] for k in self.ks},
            "evaluated_queries": self.evaluated,
            "queries_without_relevant": self.no_relevant,
        }


def recall_at_k(
    scores_or_rankings: np.ndarray,
    relevance: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    query_rows: Sequence[int] | None = None,
) -> RecallResult:
    """Recall@K of queries against a gallery.

    ``scores_or_rankings``: float scores ``[Q, N]`` (higher is better; ties keep the lower
    row first) or integer rankings ``[Q, M]`` of gallery rows, best first (``-1`` = none).
    ``relevance``: bool ``[Q, N]``. ``query_rows[q]`` is the gallery row of query ``q``,
    removed from its ranking and from its relevant set (``None``: nothing removed).
    """
    ks = tuple(int(k) for k in ks)
    relevance = np.asarray(relevance, dtype=bool)
    arr = np.asarray(scores_or_rankings)
    q = relevance.shape[0]
    if arr.shape[0] != q:
        raise MoraError(f"recall_at_k: {arr.shape[0]} rankings for {q} queries")
    if np.issubdtype(arr.dtype, np.floating):
        rankings = np.argsort(-arr, axis=1, kind="stable")
    else:
        rankings = arr.astype(np.int64)
    relevance = relevance.copy()
    valid = rankings >= 0
    if query_rows is not None:
        query_rows = np.asarray(query_rows, dtype=np.int64)
        relevance[np.arange(q), query_rows] = False
        valid &= rankings != query_rows[:, None]
    has_relevant = relevance.any(axis=1)
    rel = np.take_along_axis(relevance, np.where(valid, rankings, 0), axis=1) & valid
    rank = np.cumsum(valid, axis=1)  # 1-based rank among the valid entries
    hits = {k: int((rel & (rank <= k)).any(axis=1)[has_relevant].sum()) for k in ks}
    return RecallResult(ks, hits, int(has_relevant.sum()), int(q - has_relevant.sum()))


@dataclass
class RelevanceRule:
    """A parsed ``--relevance`` value."""

    kind: str
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "RelevanceRule":
        if text in ("exact", "primary", "any"):
            return cls(text)
        if text.startswith("jaccard:"):
            try:
                threshold = float(text.split(":", 1)[1])
            except ValueError:
                threshold = -1.0
            if 0.0 < threshold <= 1.0:
                return cls("jaccard", threshold)
        raise MoraError(f"--relevance '{text}': expected one of exact, primary, any, jaccard:T with 0 < T <= 1")


@dataclass
class CategoryTable:
    """Category sets of the gallery as a multi-hot matrix, for block-wise relevance."""

    multi_hot: np.ndarray  # [N, C] float32
    sizes: np.ndarray  # [N]
    primary: np.ndarray  # [N] int64 (-1 if unknown)

    @classmethod
    def from_items(cls, items: Sequence[Item], where: str = "index") -> "CategoryTable":
        if not items or all(not it.categories for it in items):
            raise IndexFolderError(f"{where}: items carry no COCO category labels (build it with `mora-ret index coco`)")
        ids = sorted({c for it in items for c in it.categories})
        col = {c: j for j, c in enumerate(ids)}
        multi_hot = np.zeros((len(items), len(ids)), dtype=np.float32)
        for i, it in enumerate(items):
            multi_hot[i, [col[c] for c in it.categories]] = 1.0
        primary = np.asarray([-1 if it.primary_category is None else it.primary_category for it in items], np.int64)
        return cls(multi_hot, multi_hot.sum(axis=1), primary)

    def relevance(self, rows: np.ndarray, rule: RelevanceRule) -> np.ndarray:
        """Bool ``[len(rows), N]``: which gallery images are relevant to the images ``rows``."""
        if rule.kind == "primary":
            p = self.primary[rows][:, None]
            return (p == self.primary[None, :]) & (p >= 0)
        inter = self.multi_hot[rows] @ self.multi_hot.T
        if rule.kind == "any":
            return inter > 0
        sq, sg = self.sizes[rows][:, None], self.sizes[None, :]
        if rule.kind == "exact":
            return (inter == sq) & (inter == sg)
        union = sq + sg - inter
        return inter / np.maximum(union, 1.0) >= rule.threshold - 1e-9


@dataclass
class CocoEvalResult:
    """Recall per query mode, with the settings that produced it."""

    relevance: str
    results: dict[str, RecallResult] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"relevance": self.relevance, **{mode: r.to_json() for mode, r in self.results.items()}}


def evaluate_queries(
    folder: Any, queries: np.ndarray, rule: RelevanceRule, ks: Sequence[int] = (1, 5, 10), block: int = 1024
) -> RecallResult:
    """Recall@K of ``queries[i]`` (the query of gallery row ``i``) against the index."""
    table = CategoryTable.from_items(folder.items, str(folder.path / ITEMS_FILE))
    n = folder.count
    if queries.shape[0] != n:
        raise IndexFolderError(f"{folder.path}: {queries.shape[0]} queries for {n} gallery images")
    depth = min(n, max(ks) + 1)
    total = RecallResult(tuple(ks), {k: 0 for k in ks}, 0, 0)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        _, ranked = search_vectors(folder, queries[rows], depth)
        total = total + recall_at_k(ranked, table.relevance(rows, rule), ks, query_rows=rows)
    return total


def recorded_decoding(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~.embed.EmbedConfig` fields that decode images as the index was built; a
    manifest written before ``preprocess.decode`` was recorded gives its ``fast_jpeg`` alone."""
    recorded = manifest.get("preprocess", {})
    decode = recorded.get("decode")
    if decode is None:
        return {"fast_jpeg": bool(recorded.get("fast_jpeg", False))}
    return {"gpu_decode": decode == "tensor-jpeg", "fast_jpeg": decode == "pil-draft"}


def cir_queries(folder: Any, encoder: Any, embed: Any = None, reporter: Any = None, batch: int = 4096) -> np.ndarray:
    """Every gallery image through the composed-query path with an empty caption ``[N, d]``."""
    check_encoder(folder, encoder)
    config = replace(embed or EmbedConfig(), normalize=False, skip_bad_images=False,
                     **recorded_decoding(folder.manifest))
    raw = embed_paths(encoder, [it.path for it in folder.items], config, reporter=reporter).features
    text = encoder.encode_texts([""], normalize=False)
    return np.concatenate([encoder.encode_composed(torch.from_numpy(raw[s : s + batch]), text).cpu().numpy()
                           for s in range(0, raw.shape[0], batch)])  # float32, as encode_composed gives


def evaluate_coco(
    folder: Any,
    rule: RelevanceRule,
    relevance_name: str,
    modes: Sequence[str] = ("image",),
    *,
    encoder: Any = None,
    embed: Any = None,
    reporter: Any = None,
    ks: Sequence[int] = (1, 5, 10),
) -> CocoEvalResult:
    """Recall@K per query mode (``image``: stored embeddings; ``cir``: needs ``encoder``)."""
    result = CocoEvalResult(relevance_name)
    for mode in modes:
        if mode == "image":
            queries = np.asarray(folder.embeddings, dtype=np.float32)
        elif mode == "cir":
            if encoder is None:
                raise MoraError("mode cir needs the model (it re-encodes the gallery)")
            queries = cir_queries(folder, encoder, embed, reporter)
        else:
            raise MoraError(f"unknown query mode '{mode}' (expected image or cir)")
        result.results[mode] = evaluate_queries(folder, queries, rule, ks)
    return result
