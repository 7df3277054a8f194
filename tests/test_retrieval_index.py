"""Index folders: round trip, search against brute force, index types and damaged folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mora_retrieval.errors import IndexFolderError
from mora_retrieval.retrieval.index import (
    IndexSpec,
    build_faiss_index,
    choose_index_type,
    load_index_folder,
    rebuild_index,
    resolve_index_type,
    write_index_folder,
)
from mora_retrieval.retrieval.items import Item
from mora_retrieval.retrieval.search import search_vectors

INFO = {"arch": "mora-tiny", "fingerprint": "abc123", "source": {"arch": "mora-tiny", "pretrained": None},
        "preprocess": {"size": 32}}


def _vectors(n, d=16, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _folder(tmp_path, n=50, spec=IndexSpec("Flat")):
    emb = _vectors(n)
    items = [Item(f"/imgs/{i}.jpg", i + 100, (1 + i % 3,), 1 + i % 3) for i in range(n)]
    write_index_folder(tmp_path / "idx", emb, items, spec=spec, encoder_info=INFO, collection={"kind": "test"})
    return tmp_path / "idx", emb, items


def test_round_trip(tmp_path):
    path, emb, items = _folder(tmp_path)
    folder = load_index_folder(path)
    assert folder.items == items
    assert folder.embeddings.dtype == np.float16
    assert np.array_equal(folder.embeddings, emb.astype(np.float16))
    m = folder.manifest
    assert (m["count"], m["dim"], m["metric"], m["index_type"], m["fingerprint"]) == (50, 16, "inner_product", "Flat", "abc123")
    assert m["toolkit_version"] and m["created"] and m["collection"] == {"kind": "test"}
    lines = (path / "items.jsonl").read_text().splitlines()
    assert json.loads(lines[3]) == {"row": 3, "path": "/imgs/3.jpg", "image_id": 103, "categories": [1], "primary_category": 1}


def test_flat_search_equals_numpy_ranking_over_stored_embeddings(tmp_path):
    path, _, _ = _folder(tmp_path, n=60)
    folder = load_index_folder(path)
    queries = _vectors(7, seed=3)
    scores, rows = search_vectors(folder, queries, k=10)
    stored = np.asarray(folder.embeddings, dtype=np.float32)
    ref_scores = queries @ stored.T
    ref_rows = np.argsort(-ref_scores, axis=1, kind="stable")[:, :10]
    assert np.array_equal(rows, ref_rows)
    assert np.allclose(scores, np.take_along_axis(ref_scores, ref_rows, axis=1), atol=1e-5)


def test_ivf_and_hnsw_indexes_and_rebuild(tmp_path):
    path, _, _ = _folder(tmp_path, n=400, spec=IndexSpec("IVF8,Flat", "nprobe=8"))
    folder = load_index_folder(path)
    assert folder.index.nprobe == 8  # search params from the manifest are applied on load
    queries = _vectors(5, seed=9)
    exact = np.argsort(-(queries @ np.asarray(folder.embeddings, np.float32).T), axis=1, kind="stable")[:, :5]
    _, rows = search_vectors(folder, queries, 5)
    assert np.array_equal(np.sort(rows, axis=1), np.sort(exact, axis=1))  # nprobe = nlist: exhaustive
    rebuilt = rebuild_index(path, "HNSW16", "efSearch=64")
    assert rebuilt.manifest["index_type"] == "HNSW16" and rebuilt.manifest["search_params"] == "efSearch=64"
    assert load_index_folder(path).index.ntotal == 400


def test_auto_rule_and_default_search_params():
    assert choose_index_type(99_999) == IndexSpec("Flat", "")
    assert choose_index_type(1_000_000) == IndexSpec("IVF4096,Flat", "nprobe=256")
    big = choose_index_type(10_000_000)
    assert big.factory == "IVF32768_HNSW32,Flat" and "quantizer_efSearch" in big.search_params
    assert resolve_index_type("HNSW32", 10).search_params == "efSearch=128"
    assert resolve_index_type("IVF64,PQ8", 10, "nprobe=4").search_params == "nprobe=4"


def test_bad_index_types_are_one_line_errors(tmp_path):
    with pytest.raises(IndexFolderError, match="not a valid FAISS factory string") as err:
        build_faiss_index(_vectors(10), IndexSpec("NotAnIndex"))
    assert "\n" not in str(err.value)
    with pytest.raises(IndexFolderError, match="needs at least 64 vectors"):
        build_faiss_index(_vectors(10), IndexSpec("IVF64,Flat"))


def _one_line(err, name):
    text = str(err.value)
    assert "\n" not in text and name in text, text


@pytest.mark.parametrize(
    "damage, name, expect",
    [
        (lambda p: (p / "manifest.json").unlink(), "manifest.json", "not found"),
        (lambda p: (p / "manifest.json").write_text("{nope"), "manifest.json", "not a valid"),
        (lambda p: (p / "index.faiss").unlink(), "index.faiss", "not found"),
        (lambda p: (p / "index.faiss").write_bytes(b"garbage" * 10), "index.faiss", "corrupt"),
        (lambda p: (p / "items.jsonl").unlink(), "items.jsonl", "not found"),
        (lambda p: (p / "items.jsonl").write_text("\n".join((p / "items.jsonl").read_text().splitlines()[:-1]) + "\n"),
         "items.jsonl", "49 rows"),
        (lambda p: (p / "items.jsonl").write_text("{bad json\n"), "items.jsonl", "malformed"),
        (lambda p: (p / "embeddings.npy").write_bytes(b"\x93NUMPY broken"), "embeddings.npy", "corrupt"),
        (lambda p: np.save(p / "embeddings.npy", np.zeros((49, 16), np.float16)), "embeddings.npy", "shape"),
    ],
)
def test_damaged_folder_fails_with_one_line(tmp_path, damage, name, expect):
    path, _, _ = _folder(tmp_path)
    damage(path)
    with pytest.raises(IndexFolderError, match=expect) as err:
        load_index_folder(path)
    _one_line(err, name)


def test_index_row_count_mismatch(tmp_path):
    import faiss

    path, emb, _ = _folder(tmp_path)
    small = faiss.IndexFlatIP(16)
    small.add(emb[:10])
    faiss.write_index(small, str(path / "index.faiss"))
    with pytest.raises(IndexFolderError, match="holds 10 vectors") as err:
        load_index_folder(path)
    _one_line(err, "index.faiss")


def test_missing_folder(tmp_path):
    with pytest.raises(IndexFolderError, match="index folder not found"):
        load_index_folder(tmp_path / "nope")
