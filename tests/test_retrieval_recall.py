"""Recall@K and the COCO relevance rules against independent brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest

from mora_retrieval.errors import MoraError
from mora_retrieval.retrieval.evaluate import CategoryTable, RelevanceRule, recall_at_k
from mora_retrieval.retrieval.items import Item


def brute_recall(scores, relevance, ks, self_rows):
    """Reference: per query, sort candidates by score (ties: lower row first), drop self."""
    hits = {k: 0 for k in ks}
    evaluated = skipped = 0
    for q in range(scores.shape[0]):
        candidates = [j for j in range(scores.shape[1]) if self_rows is None or j != self_rows[q]]
        relevant = {j for j in candidates if relevance[q][j]}
        if not relevant:
            skipped += 1
            continue
        evaluated += 1
        ranked = sorted(candidates, key=lambda j: (-scores[q][j], j))
        for k in ks:
            hits[k] += any(j in relevant for j in ranked[:k])
    return {k: 100.0 * hits[k] / evaluated for k in ks}, evaluated, skipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_self_removed(seed):
    rng = np.random.default_rng(seed)
    n = 30
    scores = rng.standard_normal((n, n)).astype(np.float32)
    scores[np.arange(n), np.arange(n)] = 10.0  # self always ranks first, must not count
    relevance = rng.random((n, n)) < 0.08
    relevance[np.arange(n), np.arange(n)] = True  # self is "relevant" but removed
    relevance[3] = False
    relevance[3, 3] = True  # query 3: only itself is relevant -> left out
    relevance[7] = False  # query 7: nothing relevant -> left out
    ks = (1, 5, 10)
    expected, evaluated, skipped = brute_recall(scores, relevance, ks, list(range(n)))
    result = recall_at_k(scores, relevance, ks, query_rows=np.arange(n))
    assert result.evaluated == evaluated and result.no_relevant == skipped
    assert skipped >= 2
    for k in ks:
        assert result.recall[k] == pytest.approx(expected[k])


def test_recall_from_rankings_equals_recall_from_scores():
    rng = np.random.default_rng(5)
    q, n = 12, 40
    scores = rng.standard_normal((q, n))
    relevance = rng.random((q, n)) < 0.1
    rows = rng.choice(n, size=q, replace=False)
    rankings = np.argsort(-scores, axis=1)[:, :11]
    a = recall_at_k(scores, relevance, (1, 5, 10), query_rows=rows)
    b = recall_at_k(rankings, relevance, (1, 5, 10), query_rows=rows)
    expected, evaluated, _ = brute_recall(scores, relevance, (1, 5, 10), rows)
    assert a.hits == b.hits and a.evaluated == b.evaluated == evaluated
    assert a.recall == pytest.approx(expected)


def test_recall_without_self_removal_and_padding():
    scores = np.array([[0.9, 0.1, 0.5]])
    relevance = np.array([[False, False, True]])
    r = recall_at_k(scores, relevance, (1, 2))
    assert r.recall == {1: 0.0, 2: 100.0}
    padded = recall_at_k(np.array([[2, -1, -1]]), relevance, (1, 3))
    assert padded.recall == {1: 100.0, 3: 100.0}


def _python_relevant(a: Item, b: Item, rule: RelevanceRule) -> bool:
    sa, sb = set(a.categories), set(b.categories)
    if rule.kind == "exact":
        return sa == sb
    if rule.kind == "primary":
        return a.primary_category == b.primary_category
    if rule.kind == "any":
        return bool(sa & sb)
    return len(sa & sb) / len(sa | sb) >= rule.threshold


@pytest.mark.parametrize("text", ["exact", "primary", "any", "jaccard:0.5", "jaccard:0.34"])
def test_category_relevance_matches_set_logic(text):
    rng = np.random.default_rng(1)
    items = []
    for i in range(25):
        cats = tuple(sorted(set(rng.choice([1, 2, 3, 5, 8], size=int(rng.integers(1, 4))).tolist())))
        items.append(Item(f"/x/{i}.jpg", i, cats, int(rng.choice(cats))))
    rule = RelevanceRule.parse(text)
    table = CategoryTable.from_items(items)
    got = table.relevance(np.arange(len(items)), rule)
    want = np.array([[_python_relevant(a, b, rule) for b in items] for a in items])
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bad", ["jaccard", "jaccard:0", "jaccard:x", "jaccard:1.5", "same"])
def test_bad_relevance_rule_is_one_line_error(bad):
    with pytest.raises(MoraError) as err:
        RelevanceRule.parse(bad)
    assert "\n" not in str(err.value) and bad in str(err.value)
