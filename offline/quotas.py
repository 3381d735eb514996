"""Per-channel retrieval quotas tuned on validation users: the split of the merged candidate list
between the channels (core.channel_names) that recalls the most validation positives.

Which channel deserves the slots depends on the data (text carries news, behaviour carries movies),
so the build measures it instead of fixing it. Each user's channel lists are fetched once and
re-merged for every split tried. The search grows linearly, not exponentially, with the channels:
a coarse grid (every split of the total in COARSE_UNITS equal parts: 126 for 5 channels), then
hill climbing from the best point, moving one unit from one channel to another, at FINE_UNITS
parts and again at twice as many. Ties keep the split closest to the default.

Recall@300 alone is blind to order: on the latent catalog it gave CF, the channel whose own top 10
is best there (test nDCG@10 0.122 against the pipeline's 0.106), no slots at all, so neither the
fused ranker nor score fusion could use CF's best items. So the lead channel (the best nDCG@10 of
its own list on the same validation users) always keeps at least LEAD_HEAD slots, and the search
runs over the splits that give it that many.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
from tqdm import tqdm

from core.channel_names import CHANNEL_NAMES
from offline.metrics import ndcg_at_k
from core.limits import DEFAULT_CANDIDATES, DEFAULT_QUOTAS
from core.merge import CandidateMerger
from core.retriever import Retriever
from core.types import ChannelResult

COARSE_UNITS = 5          # the coarse grid: shares in steps of total / 5
FINE_UNITS = (10, 20)     # then hill climbing in steps of total / 10, then total / 20
LEAD_HEAD = 50            # of the 300: slots the lead channel always keeps (its top 50)
LEAD_K = 10               # the lead is judged on nDCG@10 of its own list, the figure the slate is judged on


def compositions(units: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to write `units` as `parts` non-negative integers (stars and bars)."""
    out = []
    for bars in combinations(range(units + parts - 1), parts - 1):
        edges = (-1, *bars, units + parts - 1)
        out.append(tuple(b - a - 1 for a, b in zip(edges[:-1], edges[1:])))
    return out


def quota_grid(total: int = DEFAULT_CANDIDATES, channels: tuple[str, ...] = CHANNEL_NAMES,
               units: int = COARSE_UNITS) -> list[dict[str, int]]:
    """The coarse grid: each split of `total` in `units` parts (the last channel takes the rounding)."""
    grid = []
    for parts in compositions(units, len(channels)):
        quotas = {c: round(total * p / units) for c, p in zip(channels, parts)}
        quotas[channels[-1]] += total - sum(quotas.values())
        grid.append(quotas)
    return grid


class _Scorer:
    """Mean recall@total of a split over the users' fetched lists, memoised by split."""

    def __init__(self, lists: list[tuple[dict[str, ChannelResult], np.ndarray]], total: int) -> None:
        self.lists, self.total = lists, total
        self.merger = CandidateMerger()
        self.recall: dict[str, tuple[dict[str, int], float]] = {}

    def __call__(self, quotas: dict[str, int]) -> float:
        key = quota_key(quotas)
        if key not in self.recall:
            hits = sum(float(np.isin(positives, self.merger.items(results, quotas, self.total)).mean())
                       for results, positives in self.lists)
            self.recall[key] = (dict(quotas), hits / max(len(self.lists), 1))
        return self.recall[key][1]


def _distance(q: dict[str, int]) -> int:
    return sum(abs(q.get(c, 0) - DEFAULT_QUOTAS.get(c, 0)) for c in set(q) | set(DEFAULT_QUOTAS))


def _better(score: _Scorer, a: dict[str, int], b: dict[str, int]) -> bool:
    """a beats b: higher recall (to 1e-6), then nearer the default."""
    return (round(score(a), 6), -_distance(a)) > (round(score(b), 6), -_distance(b))


def _climb(score: _Scorer, start: dict[str, int], step: int, allowed) -> dict[str, int]:
    best = dict(start)
    while True:
        moves = [dict(best, **{a: best[a] - step, b: best[b] + step})
                 for a in best for b in best if a != b and best[a] >= step]
        winner = best
        for q in moves:
            if allowed(q) and _better(score, q, winner):
                winner = q
        if winner is best:
            return best
        best = winner


def channel_ndcg(lists: list[tuple[dict[str, ChannelResult], np.ndarray]], k: int = LEAD_K) -> dict[str, float]:
    """Mean nDCG@k of each channel's own list over the users' fetched lists."""
    channels = list(lists[0][0]) if lists else []
    return {c: float(np.mean([ndcg_at_k(results[c].items[:k].tolist(), set(positives.tolist()), k)
                              for results, positives in lists])) for c in channels}


def lead_channel(ndcg: dict[str, float]) -> str | None:
    """The channel with the best nDCG (ties: the earlier one); None when every channel scores 0."""
    best = max(ndcg.values(), default=0.0)
    return next((c for c, v in ndcg.items() if v == best), None) if best > 0 else None


def tune_quotas(retriever: Retriever, histories: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                users: list[str], total: int = DEFAULT_CANDIDATES, progress: bool = True,
                lead_head: int = LEAD_HEAD) -> tuple[dict[str, int], dict[str, float], dict[str, object]]:
    """-> (best quotas, recall@total of every split tried, keyed by quota_key, the lead channel:
    {"channel", "head", "valid_ndcg@10"}) on `users`, whose positives are targets[u] and history
    histories[u]. Only splits giving the lead channel >= lead_head slots are chosen; the default
    split is always scored (and chosen only if it does)."""
    lists = []
    for user in tqdm(users, desc="quotas", unit="user", disable=not progress):
        positives = targets.get(user)
        if positives is None or not len(positives):
            continue
        history = histories.get(user, np.zeros(0, np.int64))
        lists.append((retriever.channel_results(user, history, np.zeros(0, np.int64), total), positives))
    channels = tuple(retriever.generator.channels)
    ndcg = channel_ndcg(lists)
    lead = lead_channel(ndcg)
    head = min(lead_head, total) if lead is not None else 0

    def allowed(q: dict[str, int]) -> bool:
        return lead is None or q.get(lead, 0) >= head
    score = _Scorer(lists, total)
    score(dict(DEFAULT_QUOTAS))
    best = dict(DEFAULT_QUOTAS) if allowed(DEFAULT_QUOTAS) else None
    for q in quota_grid(total, channels):   # all scored: the table shows what the lead's head costs
        score(q)
        if allowed(q) and (best is None or _better(score, q, best)):
            best = q
    for units in FINE_UNITS:
        best = _climb(score, best, max(1, round(total / units)), allowed)
    table = {key: recall for key, (_, recall) in score.recall.items()}
    return best, table, {"channel": lead, "head": head, f"valid_ndcg@{LEAD_K}": ndcg}


def quota_key(quotas: dict[str, int]) -> str:
    """'bert/cf/popular/item2item/sequential' counts, in core.channel_names order."""
    return "/".join(str(quotas.get(c, 0)) for c in CHANNEL_NAMES)
