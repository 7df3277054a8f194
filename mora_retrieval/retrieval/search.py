"""Queries against an index folder: image, text or composed (image + text).

The query model must be the one the index was built with: :func:`check_encoder` compares the
encoder's weights fingerprint with the manifest's and refuses a mismatch. Search runs on
FAISS (on the GPU when the installed faiss has GPU support); on a CUDA machine without GPU
FAISS, an exact (``Flat``) index is searched as a float32 matmul on the GPU over the stored
embeddings (the values the index holds), which gives the same ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..data.images import load_image
from ..errors import IndexFolderError, MoraError
from .index import IndexFolder
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
            f"{folder.path / 'manifest.json'}: index was built with weights {expected} "
            f"({folder.manifest.get('arch')}), the query model has {encoder.fingerprint}; {hint}"
        )
    if encoder.dim != folder.dim:
        raise IndexFolderError(f"{folder.path}: index dimension {folder.dim}, query model gives {encoder.dim}")


def _use_torch_exact(folder: IndexFolder) -> bool:
    return folder.manifest.get("index_type") == "Flat" and torch.cuda.is_available() and faiss.get_num_gpus() == 0


def search_vectors(folder: IndexFolder, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` of the top ``k`` rows for each query (float32 ``[Q, d]``).

    Rows are ``-1`` (score ``-inf``) where the index returns fewer than ``k`` results.
    """
    queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if queries.ndim != 2 or queries.shape[1] != folder.dim:
        raise IndexFolderError(f"{folder.path}: queries of shape {queries.shape} do not match index dimension {folder.dim}")
    k = max(1, min(int(k), folder.count))
    if _use_torch_exact(folder):
        gallery = folder.cache.get("torch_gallery")
        if gallery is None:
            gallery = folder.cache["torch_gallery"] = torch.from_numpy(np.asarray(folder.embeddings, dtype=np.float32)).cuda()
        q = torch.from_numpy(queries).cuda()
        scores, rows = torch.topk(q @ gallery.T, k, dim=1)
        return scores.cpu().numpy(), rows.cpu().numpy().astype(np.int64)
    if folder.index is None:
        raise IndexFolderError(f"{folder.path}: index not loaded")
    index = folder.index

    if faiss.get_num_gpus() > 0 and not folder.cache.get("faiss_on_gpu"):
        try:
            folder.index = index = faiss.index_cpu_to_all_gpus(index)
        except RuntimeError:
            pass  # index types without a GPU implementation stay on the CPU
        folder.cache["faiss_on_gpu"] = True
    scores, rows = index.search(queries, k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    return scores, rows.astype(np.int64)


def encode_query(encoder: Any, image: str | Path | None = None, text: str | None = None) -> np.ndarray:
    """The ``[1, d]`` query feature: image only, text only, or composed when both are given."""
    if image is None and text is None:
        raise MoraError("give a query: --image FILE, --text TEXT, or both")
    img_raw = txt_raw = None
    if image is not None:
        batch = encoder.preprocess(load_image(image)).unsqueeze(0)
        img_raw = encoder.encode_images(batch, normalize=False)
    if text is not None:
        txt_raw = encoder.encode_texts([text], normalize=False)
    if img_raw is not None and txt_raw is not None:
        feats = encoder.encode_composed(img_raw, txt_raw)
    else:
        feats = F.normalize(img_raw if img_raw is not None else txt_raw, dim=-1)
    return feats.float().cpu().numpy()


def search(
    folder: IndexFolder, encoder: Any, *, image: str | Path | None = None, text: str | None = None, k: int = 10
) -> list[Hit]:
    """Encode one query and return its top ``k`` hits."""
    check_encoder(folder, encoder)
    query = encode_query(encoder, image=image, text=text)
    scores, rows = search_vectors(folder, query, k)
    return [
        Hit(rank=r + 1, score=float(s), row=int(row), item=folder.items[int(row)])
        for r, (s, row) in enumerate(zip(scores[0], rows[0]))
        if row >= 0
    ]
