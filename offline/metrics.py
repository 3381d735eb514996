"""Offline evaluation metrics: top-k ranking, AUC, MIND impression metrics, beyond-accuracy.

Conventions shared by every function here:
  * Top-k metrics take `ranked` (best first) and a set of `relevant` ids. An id repeated in
    `ranked` counts once, at its first position. With no relevant ids, or nothing ranked, they
    return 0.0 (there is nothing to find): evaluation should skip users without relevant items
    rather than average those zeros in. k <= 0 is a programming error (ValueError).
  * AUC is undefined with a single class and returns NaN; averages over impressions/groups skip
    NaN values and are NaN when nothing is left.
  * Ties in scores: AUC counts a tied positive/negative pair as 0.5; the MIND ranking metrics order
    tied scores by input position (stable sort), which may differ from the official script's
    unstable sort on ties only.
  * Scores must be finite: NaN scores raise ValueError (a NaN would silently scramble the order).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


def _first_hits(ranked: Sequence[Hashable], relevant: set, k: int) -> list[int]:
    """0-based positions within the top k where a relevant id first appears."""
    seen: set = set()
    hits = []
    for pos, item in enumerate(ranked[:k]):
        if item in relevant and item not in seen:
            hits.append(pos)
        seen.add(item)
    return hits


def recall_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """Share of the relevant ids found in the top k: |top-k ∩ relevant| / |relevant|."""
    _check_k(k)
    if not relevant:
        return 0.0
    return len(_first_hits(ranked, relevant, k)) / len(relevant)


def hit_rate_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """1.0 when any relevant id is in the top k, else 0.0."""
    _check_k(k)
    return 1.0 if _first_hits(ranked, relevant, k) else 0.0


def ndcg_at_k(ranked: Sequence[Hashable], relevant: set, k: int) -> float:
    """Binary-relevance nDCG@k: sum 1/log2(pos+2) over hits, over the ideal min(|relevant|, k) hits."""
    _check_k(k)
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(pos + 2) for pos in _first_hits(ranked, relevant, k))
    ideal = sum(1.0 / math.log2(pos + 2) for pos in range(min(len(relevant), k)))
    return dcg / ideal


def mrr(ranked: Sequence[Hashable], relevant: set, k: int | None = None) -> float:
    """Reciprocal rank (1-based) of the first relevant id within the top k (all if k is None); 0 if none."""
    if k is not None:
        _check_k(k)
    for pos, item in enumerate(ranked if k is None else ranked[:k]):
        if item in relevant:
            return 1.0 / (pos + 1)
    return 0.0


def _arrays(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if len(s) != len(y):
        raise ValueError(f"scores [{len(s)}] and labels [{len(y)}] differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, y


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties count 0.5.

    scores [n] float, labels [n] (nonzero = positive). NaN when there is only one class (or n = 0).
    Computed from average ranks (Mann-Whitney U), O(n log n)."""
    s, y = _arrays(scores, labels)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = (ends - counts + 1 + ends) / 2.0   # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse.ravel()][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_auc(groups: Iterable[tuple[Sequence[float], Sequence]]) -> float:
    """Unweighted mean AUC over (scores, labels) groups (users or impressions) with both classes.

    This is the MIND "AUC" (mean over impressions). NaN when no group has both classes."""
    values = [auc(s, y) for s, y in groups]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _dcg(gains_in_order: np.ndarray, k: int) -> float:
    top = gains_in_order[:k]
    return float(np.sum((2.0 ** top - 1.0) / np.log2(np.arange(len(top)) + 2.0)))


def impression_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray
                       ) -> dict[str, float]:
    """MIND's per-impression metrics: {"auc", "mrr", "ndcg@5", "ndcg@10"}.

    As the official evaluation script: mrr = sum(label / rank) / sum(label) over the ranking by score
    (so with several clicks it averages their reciprocal ranks); ndcg@k = DCG / ideal DCG with gains
    2^label - 1 and discounts log2(rank + 1). Without any click every value is NaN; with only
    clicks auc is NaN and the others are 1.0."""
    s, y = _arrays(scores, labels)
    labels01 = y.astype(np.float64)
    n_pos = labels01.sum()
    if n_pos == 0:
        return {"auc": float("nan"), "mrr": float("nan"), "ndcg@5": float("nan"), "ndcg@10": float("nan")}
    ordered = labels01[np.argsort(-s, kind="stable")]
    ideal = np.sort(labels01)[::-1]
    return {
        "auc": auc(s, y),
        "mrr": float(np.sum(ordered / (np.arange(len(ordered)) + 1.0)) / n_pos),
        "ndcg@5": _dcg(ordered, 5) / _dcg(ideal, 5),
        "ndcg@10": _dcg(ordered, 10) / _dcg(ideal, 10),
    }


def mean_impression_metrics(groups: Iterable[tuple[Sequence[float], Sequence]]) -> dict[str, float]:
    """Average of impression_metrics over impressions, each metric skipping its NaN values.

    Also returns "impressions": how many (scores, labels) pairs were given."""
    rows = [impression_metrics(s, y) for s, y in groups]
    out: dict[str, float] = {}
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = float(np.mean(values)) if values else float("nan")
    out["impressions"] = float(len(rows))
    return out


def intra_list_diversity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance (1 - cos) over the slate; vectors [k, d]. 0.0 when k < 2.

    A zero vector has cosine 0 with everything (distance 1)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be [k, d], got shape {x.shape}")
    k = len(x)
    if k < 2:
        return 0.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1.0, norms)
    upper = np.triu_indices(k, 1)
    return float(np.mean(1.0 - (x @ x.T)[upper]))


def category_coverage(categories: Sequence[Hashable]) -> float:
    """Distinct categories / slate length (1.0 = every item from a different category); 0.0 if empty."""
    return len(set(categories)) / len(categories) if len(categories) else 0.0


def catalog_coverage(slates: Iterable[Iterable[Hashable]], n_items: int) -> float:
    """Share of the catalog (n_items) that appears in at least one slate; 0.0 if n_items <= 0."""
    if n_items <= 0:
        return 0.0
    shown: set = set()
    for slate in slates:
        shown.update(slate)
    return len(shown) / n_items


def popularity_ranks(item_ids: Iterable[Hashable]) -> dict[Hashable, int]:
    """Interaction item ids -> {item: 1-based popularity rank}, 1 = most interactions.

    Equal counts get consecutive ranks in first-seen order (deterministic)."""
    counts: dict[Hashable, int] = {}
    for item in item_ids:
        counts[item] = counts.get(item, 0) + 1
    ordered = sorted(counts, key=lambda it: -counts[it])   # stable: ties keep first-seen order
    return {item: rank for rank, item in enumerate(ordered, start=1)}


def novelty(slate: Sequence[Hashable], popularity_rank: Mapping[Hashable, int]) -> float:
    """Mean popularity rank of the slate's items (1 = most popular, so higher = more novel).

    An item missing from popularity_rank (never interacted with) gets len(popularity_rank) + 1,
    the least popular rank. 0.0 for an empty slate (impossible as a mean of ranks >= 1)."""
    if not len(slate):
        return 0.0
    unseen = len(popularity_rank) + 1
    return float(np.mean([popularity_rank.get(item, unseen) for item in slate]))


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean of per-list values (0 for fewer than two)."""
    values = np.asarray(values, np.float64)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def measurable_gain(gains: Sequence[float] | np.ndarray, min_z: float) -> bool:
    """Whether per-list paired gains raise the mean by more than noise: mean > 0 and at least
    min_z standard errors of the per-list gains."""
    gains = np.asarray(gains, np.float64)
    if len(gains) == 0:
        return False
    mean = float(gains.mean())
    return mean > 0 and mean >= min_z * standard_error(gains)
