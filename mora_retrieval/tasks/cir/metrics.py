"""CIRR metrics (docs/protocols.md §4): Recall@K with the reference removed, and Recall_subset@K.

Both work on one similarity matrix ``[queries, gallery]`` and one ranking: gallery items by
descending score, ties in gallery order (a stable sort), the query's reference removed. The
metric counts the items this ranking puts before the target, and the test1 export
(``cirr_rankings``) writes the same ranking, so a tie never counts in the target's favour
(as in CLIP4Cir's evaluation) and a validation figure is what the CIRR server would score
from the exported files.
"""

from __future__ import annotations

from typing import Sequence

import torch

RECALL_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)


def _ranked_before(sim: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[q, g]`` mask of the items a stable descending sort of each row puts before ``target``."""
    score = sim.gather(1, target[:, None])
    earlier = torch.arange(sim.shape[1])[None, :] < target[:, None]
    return (sim > score) | ((sim == score) & earlier)


def cirr_recalls(
    similarity: torch.Tensor,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    target_names: Sequence[str],
    subset_members: Sequence[Sequence[str]],
) -> dict[str, float]:
    """Recall@{1,5,10,50}, Recall_subset@{1,2,3} (percent) and ``avg`` = (R@5 + R_subset@1) / 2."""
    sim = similarity.detach().float().cpu()
    q, g = sim.shape
    lookup = {name: i for i, name in enumerate(gallery_names)}
    rows = torch.arange(q)
    ref = torch.tensor([lookup[n] for n in reference_names])
    tgt = torch.tensor([lookup.get(n, -1) for n in target_names])
    if (tgt < 0).any():
        missing = target_names[int(torch.nonzero(tgt < 0)[0])]
        raise ValueError(f"target image {missing!r} is not in the gallery")
    before = _ranked_before(sim, tgt)
    before[rows, ref] = False
    rank = before.sum(dim=1)
    out = {f"recall@{k}": 100.0 * (rank < k).float().mean().item() for k in RECALL_KS}

    member = torch.zeros(q, g, dtype=torch.bool)
    for i, members in enumerate(subset_members):
        for name in members:
            if name in lookup:
                member[i, lookup[name]] = True
    member[rows, ref] = False
    in_subset = member[rows, tgt]
    subset_rank = (before & member).sum(dim=1)
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
    """Per query: the top ``top`` gallery names and top ``subset_top`` members, reference removed."""
    sim = similarity.detach().float().cpu()
    lookup = {name: i for i, name in enumerate(gallery_names)}
    ref = [lookup[n] for n in reference_names]
    order = sim.argsort(dim=1, descending=True, stable=True)[:, : top + 1].tolist()
    full = [[gallery_names[j] for j in row if j != r][:top] for row, r in zip(order, ref)]
    subset = []
    for i, members in enumerate(subset_members):
        kept = sorted({lookup[m] for m in members if m in lookup} - {ref[i]}, key=lambda j: (-float(sim[i, j]), j))
        subset.append([gallery_names[j] for j in kept[:subset_top]])
    return full, subset


def submission_files(pairids: Sequence[int], full: list[list[str]], subset: list[list[str]]) -> tuple[dict, dict]:
    """The two JSON objects the CIRR evaluation server takes (``recall`` and ``recall_subset``)."""
    recall = {"version": "rc2", "metric": "recall"}
    recall_subset = {"version": "rc2", "metric": "recall_subset"}
    for pairid, names, members in zip(pairids, full, subset):
        recall[str(pairid)] = names
        recall_subset[str(pairid)] = members
    return recall, recall_subset
