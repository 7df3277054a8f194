"""CIRR metrics (METHOD.md §4): Recall@K with the reference removed, and Recall_subset@K.

Both work on one similarity matrix ``[queries, gallery]``. A target's rank is the number of
gallery items scoring strictly higher (the query's reference excluded), so ties resolve in
the target's favour, as a stable sort over a ranking that lists the target first would.
"""

from __future__ import annotations

from typing import Sequence

import torch

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)


def _index(names: Sequence[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}


def cirr_recalls(
    similarity: torch.Tensor,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    target_names: Sequence[str],
    subset_members: Sequence[Sequence[str]],
) -> dict[str, float]:
    """Recall@{1,5,10,50}, Recall_subset@{1,2,3} (percent) and ``avg`` = (R@5 + R_subset@1) / 2."""
    sim = similarity.detach().float().cpu().clone()
    q, g = sim.shape
    lookup = _index(gallery_names)
    rows = torch.arange(q)
    ref = torch.tensor([lookup[n] for n in reference_names])
    tgt = torch.tensor([lookup.get(n, -1) for n in target_names])
    if (tgt < 0).any():
        missing = target_names[int(torch.nonzero(tgt < 0)[0])]
        raise ValueError(f"target image {missing!r} is not in the gallery")
    sim[rows, ref] = float("-inf")
    target_score = sim[rows, tgt]
    rank = (sim > target_score[:, None]).sum(dim=1)
    out = {f"recall@{k}": 100.0 * (rank < k).float().mean().item() for k in RECALL_KS}

    member = torch.zeros(q, g, dtype=torch.bool)
    for i, members in enumerate(subset_members):
        for name in members:
            if name in lookup:
                member[i, lookup[name]] = True
    member[rows, ref] = False
    in_subset = member[rows, tgt]
    subset_rank = ((sim > target_score[:, None]) & member).sum(dim=1)
    for k in SUBSET_KS:
        hit = in_subset & (subset_rank < k)
        out[f"recall_subset@{k}"] = 100.0 * hit.float().mean().item()
    out["avg"] = (out["recall@5"] + out["recall_subset@1"]) / 2
    return out


def cirr_rankings(
    similarity: torch.Tensor,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    subset_members: Sequence[Sequence[str]],
    top: int = 50,
    subset_top: int = 3,
) -> tuple[list[list[str]], list[list[str]]]:
    """Per query: the top ``top`` gallery names (reference removed) and top ``subset_top`` members."""
    sim = similarity.detach().float().cpu().clone()
    lookup = _index(gallery_names)
    rows = torch.arange(sim.shape[0])
    ref = torch.tensor([lookup[n] for n in reference_names])
    sim[rows, ref] = float("-inf")
    order = sim.argsort(dim=1, descending=True, stable=True)[:, :top]
    full = [[gallery_names[j] for j in row.tolist()] for row in order]
    subset = []
    for i, members in enumerate(subset_members):
        kept = [m for m in members if m != reference_names[i] and m in lookup]
        kept.sort(key=lambda name: -float(sim[i, lookup[name]]))
        subset.append(kept[:subset_top])
    return full, subset


def submission_files(pairids: Sequence[int], full: list[list[str]], subset: list[list[str]]) -> tuple[dict, dict]:
    """The two JSON objects the CIRR evaluation server takes (``recall`` and ``recall_subset``)."""
    recall = {"version": "rc2", "metric": "recall"}
    recall_subset = {"version": "rc2", "metric": "recall_subset"}
    for pairid, names, members in zip(pairids, full, subset):
        recall[str(pairid)] = names
        recall_subset[str(pairid)] = members
    return recall, recall_subset
