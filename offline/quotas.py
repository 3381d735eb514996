"""Per-channel retrieval quotas tuned on validation users: the split of the merged candidate list
between the BERT, CF and popular channels that recalls the most validation positives.

Which channel deserves the slots depends on the data (text carries news, behaviour carries movies),
so the build measures it instead of fixing it. Each user's channel lists are fetched once and
re-merged for every candidate split on a coarse grid; ties keep the split closest to the default.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from core.limits import DEFAULT_CANDIDATES, DEFAULT_QUOTAS
from core.merge import CandidateMerger
from core.retriever import Retriever

POPULAR_SHARES = (0.0, 0.1, 0.2)
BERT_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def quota_grid(total: int = DEFAULT_CANDIDATES) -> list[dict[str, int]]:
    """Candidate splits of `total`: popular and BERT shares from the grids, CF the rest."""
    grid = []
    for popular in POPULAR_SHARES:
        for bert in BERT_SHARES:
            if bert + popular <= 1.0:
                p, b = round(popular * total), round(bert * total)
                grid.append({"bert": b, "cf": total - b - p, "popular": p})
    return grid


def tune_quotas(retriever: Retriever, histories: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                users: list[str], total: int = DEFAULT_CANDIDATES,
                progress: bool = True) -> tuple[dict[str, int], dict[str, float]]:
    """-> (best quotas, recall@total of each grid point keyed by 'bert/cf/popular') on `users`,
    whose positives are targets[u] and history histories[u]. The default split is always scored."""
    grid = quota_grid(total)
    if DEFAULT_QUOTAS not in grid:
        grid.append(dict(DEFAULT_QUOTAS))
    merger = CandidateMerger()
    hits = np.zeros(len(grid))
    counted = 0
    for user in tqdm(users, desc="quotas", unit="user", disable=not progress):
        positives = targets.get(user)
        if positives is None or not len(positives):
            continue
        history = histories.get(user, np.zeros(0, np.int64))
        results = retriever.channel_results(user, history, np.zeros(0, np.int64), total)
        for j, quotas in enumerate(grid):
            items = merger.merge(results, quotas, total).items
            hits[j] += np.isin(positives, items).mean()
        counted += 1
    recall = hits / max(counted, 1)
    # Ties (and a grid that recalls nothing) go to the split nearest the default.
    distance = [sum(abs(q[c] - DEFAULT_QUOTAS[c]) for c in q) for q in grid]
    best = max(range(len(grid)), key=lambda j: (round(recall[j], 6), -distance[j]))
    table = {quota_key(q): float(r) for q, r in zip(grid, recall)}
    return grid[best], table


def quota_key(quotas: dict[str, int]) -> str:
    return f"{quotas['bert']}/{quotas['cf']}/{quotas['popular']}"
