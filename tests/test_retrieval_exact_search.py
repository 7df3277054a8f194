"""Exact search with torch (the CUDA path without GPU FAISS), run on the CPU against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mora_retrieval.retrieval.index import IndexSpec, load_index_folder, write_index_folder
from mora_retrieval.retrieval.items import Item
from mora_retrieval.retrieval.search import (
    RERANK_MARGIN,
    device_gallery,
    exact_search,
    plan_exact_search,
    search_exact_torch,
    search_vectors,
)


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(queries, stored, k):
    scores = queries @ stored.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def test_plan_keeps_every_tile_within_budget():
    for q, n, k, nbytes, budget in [(1, 1_000_000, 10, 2, 1 << 30), (1000, 1_000_000, 10, 2, 1 << 30),
                                    (50_000, 1000, 5, 4, 1 << 20), (10, 50, 10, 4, 84), (7, 50, 3, 2, 10)]:
        plan = plan_exact_search(q, n, k, nbytes, budget)
        assert plan.query_rows * plan.gallery_rows * nbytes <= max(budget, nbytes), (q, n, plan)
        assert 1 <= plan.query_rows <= q and 1 <= plan.gallery_rows <= n
        qs, gs = plan.query_slices(q), plan.gallery_slices(n)
        assert qs[0].start == 0 and qs[-1].stop == q and all(a.stop == b.start for a, b in zip(qs, qs[1:]))
        assert gs[0].start == 0 and gs[-1].stop == n and all(a.stop == b.start for a, b in zip(gs, gs[1:]))
    one = plan_exact_search(1, 1_000_000, 10, 2)
    assert (one.query_rows, one.gallery_rows) == (1, 1_000_000)  # batch 1: one product, one topk
    big = plan_exact_search(1000, 1_000_000, 10, 2)
    assert big.gallery_rows == 1_000_000 and big.query_rows == 536  # [536, 1M] float16 scores ~ 1 GiB
    assert plan_exact_search(5, 100, 10, 4).candidates == 10  # float32 scores: no re-rank
    assert plan_exact_search(5, 100, 10, 2).candidates == 10 + RERANK_MARGIN
    assert plan_exact_search(5, 20, 10, 2).candidates == 20
    with pytest.raises(ValueError, match="empty search"):
        plan_exact_search(0, 10, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cells, k, tiles", [(1 << 20, 10, (1, 1)), (120, 1, (5, 1)), (21, 10, (10, 3)),
                                             (7, 10, (10, 8)), (21, 50, (10, 3)), (1, 3, (10, 50))])
def test_tiled_search_equals_brute_force(dtype, cells, k, tiles):
    """Chunk boundaries on both axes, tiles narrower than k (7 < 10), k = N and 1x1 tiles."""
    stored = torch.from_numpy(_unit(50, 16, 0)).to(dtype)
    queries = _unit(10, 16, 1)
    ref_scores, ref_rows = _brute(queries, stored.float().numpy(), k)
    plan = plan_exact_search(10, 50, k, stored.element_size(), cells * stored.element_size())
    assert (len(plan.query_slices(10)), len(plan.gallery_slices(50))) == tiles
    scores, rows = exact_search(stored, torch.from_numpy(queries), k, plan)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64 and rows.shape == (10, min(k, 50))
    assert np.array_equal(rows.numpy(), ref_rows)
    assert np.allclose(scores.numpy(), ref_scores, atol=1e-6)  # float32 scores of the stored values


def test_rerank_restores_the_float32_order_of_near_ties():
    """Rows whose float16 scores tie are ordered by their exact float32 scores."""
    base = _unit(1, 64, 3)[0]
    rng = np.random.default_rng(4)
    stored = np.stack([base + 1e-3 * rng.standard_normal(64).astype(np.float32) for _ in range(40)])
    stored = (stored / np.linalg.norm(stored, axis=1, keepdims=True)).astype(np.float16)
    query = base[None]
    _, ref_rows = _brute(query, stored.astype(np.float32), 5)
    _, rows = exact_search(torch.from_numpy(stored), torch.from_numpy(query), 5)
    assert np.array_equal(rows.numpy(), ref_rows)
    low = (torch.from_numpy(query).half() @ torch.from_numpy(stored).T)[0]
    assert low.unique().numel() < 40  # float16 scores alone do tie


def _flat_folder(tmp_path, n: int, dim: int, seed: int):
    """A Flat index folder of ``n`` random unit vectors, loaded back."""
    items = [Item(f"/x/{i}.jpg", i, (1,), 1) for i in range(n)]
    info = {"arch": "mora-tiny", "fingerprint": "f", "source": {}, "preprocess": {}}
    write_index_folder(tmp_path / "idx", _unit(n, dim, seed), items, spec=IndexSpec("Flat"), encoder_info=info)
    return load_index_folder(tmp_path / "idx")


def test_folder_search_caches_the_gallery_and_matches_faiss(tmp_path):
    folder = _flat_folder(tmp_path, 300, 32, seed=5)
    queries = _unit(37, 32, 6)
    scores, rows = search_exact_torch(folder, queries, 12, "cpu")
    faiss_scores, faiss_rows = search_vectors(folder, queries, 12)  # FAISS IndexFlatIP on the CPU
    assert np.array_equal(rows, faiss_rows) and np.allclose(scores, faiss_scores, atol=1e-5)
    gallery = device_gallery(folder, "cpu", torch.float32)
    assert device_gallery(folder, "cpu", torch.float32) is gallery  # uploaded once, not per call
    assert np.array_equal(gallery.numpy(), np.asarray(folder.embeddings, np.float32))
    single_scores, single_rows = search_exact_torch(folder, queries[:1], 3, "cpu")
    assert single_rows.shape == (1, 3) and np.array_equal(single_rows[0], rows[0, :3])


@pytest.mark.gpu
def test_cuda_exact_search_equals_brute_force(tmp_path):
    folder = _flat_folder(tmp_path, 5000, 64, seed=7)
    queries = _unit(1500, 64, 8)
    ref_scores, ref_rows = _brute(queries, np.asarray(folder.embeddings, np.float32), 10)
    scores, rows = search_exact_torch(folder, queries, 10, "cuda")
    assert folder.cache[("exact_gallery", "cuda", "torch.float16")].dtype == torch.float16
    assert (rows == ref_rows).mean() > 0.999 and np.allclose(scores, ref_scores, atol=1e-3)
    scores1, rows1 = search_exact_torch(folder, queries[:1], 10, "cuda")
    assert np.array_equal(rows1[0], rows[0])
