"""Retrieval channels: each turns a user's history into a ranked list of item indices.

Channels over-fetch by the size of the exclusion set so that filtering seen and excluded items
still leaves each channel its quota.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from common.online_items import OnlineItems

# Only the most recent part of a history shapes the content vector: older tastes fade.
BERT_HISTORY = 50


@dataclass(frozen=True)
class ChannelResult:
    items: np.ndarray    # [m] int64 item indices, best first (exclusions already removed)
    scores: np.ndarray   # [m] float32


EMPTY = ChannelResult(np.zeros(0, np.int64), np.zeros(0, np.float32))


def _search(index: faiss.Index, query: np.ndarray, want: int, exclude: set[int],
            max_k: int | None = None) -> ChannelResult:
    """max_k: the most results one search may ask for (a GPU index refuses more than GPU_MAX_K)."""
    fetch = min(index.ntotal, want + len(exclude), max_k or index.ntotal)
    if fetch <= 0:
        return EMPTY
    scores, ids = index.search(query.reshape(1, -1).astype(np.float32, copy=False), fetch)
    keep = [j for j, i in enumerate(ids[0]) if i >= 0 and int(i) not in exclude][:want]
    return ChannelResult(ids[0, keep].astype(np.int64), scores[0, keep].astype(np.float32))


class BertChannel:
    """Content channel: mean BERT vector of the recent history, searched in the text index."""
    name = "bert"

    def __init__(self, index: faiss.Index, item_vectors: np.ndarray,
                 online: OnlineItems | None = None, max_k: int | None = None) -> None:
        self.index = index
        self.max_k = max_k
        self.item_vectors = item_vectors   # [n_items, d] unit rows
        self.online = online               # items added while serving (indices >= n_items)

    def vectors(self, items: np.ndarray) -> np.ndarray:
        """items [m] -> [m, d], online items included."""
        n = len(self.item_vectors)
        if self.online is None or len(items) == 0 or items.max() < n:
            return self.item_vectors[items]
        known = items < n
        out = np.empty((len(items), self.item_vectors.shape[1]), np.float32)
        out[known] = self.item_vectors[items[known]]
        out[~known] = self.online.vectors[items[~known] - n]
        return out

    def add(self, indices: np.ndarray, vectors: np.ndarray) -> None:
        """Make items retrievable now (replacing any vector they had)."""
        try:
            self.index.remove_ids(indices)
        except RuntimeError:   # HNSW and GPU indexes cannot remove: the merge dedupes the stale twin
            pass
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), indices)

    def retrieve(self, history: np.ndarray, want: int, exclude: set[int]) -> ChannelResult:
        if len(history) == 0:
            return EMPTY
        recent = history[-BERT_HISTORY:]
        # Recency weights: the latest item counts twice as much as the oldest one kept.
        weights = np.linspace(1.0, 2.0, len(recent), dtype=np.float32)
        query = weights @ self.vectors(recent)
        norm = np.linalg.norm(query)
        if norm == 0:
            return EMPTY
        return _search(self.index, query / norm, want, exclude, self.max_k)


class CfChannel:
    """Collaborative channel: the user's trained ALS vector, or one folded in from their history."""
    name = "cf"

    def __init__(self, index: faiss.Index, user_ids: list[str], user_factors: np.ndarray,
                 item_factors: np.ndarray, gram: np.ndarray, alpha: float, regularization: float,
                 max_k: int | None = None) -> None:
        self.index = index
        self.max_k = max_k
        self.user_row = {u: i for i, u in enumerate(user_ids)}
        self.user_factors = user_factors
        self.item_factors = item_factors
        self.gram = gram
        self.alpha = alpha
        self.regularization = regularization

    def user_vector(self, user_id: str, history: np.ndarray) -> np.ndarray | None:
        row = self.user_row.get(user_id)
        if row is not None:
            return self.user_factors[row]
        history = history[history < len(self.item_factors)]   # online items have no CF factor
        if len(history) == 0:
            return None
        y = self.item_factors[np.unique(history)]
        a = self.gram + self.alpha * (y.T @ y) + self.regularization * np.eye(len(self.gram), dtype=np.float32)
        return np.linalg.solve(a, (1.0 + self.alpha) * y.sum(0)).astype(np.float32)

    def retrieve(self, user_id: str, history: np.ndarray, want: int, exclude: set[int]) -> ChannelResult:
        vector = self.user_vector(user_id, history)
        if vector is None:
            return EMPTY
        return _search(self.index, vector, want, exclude, self.max_k)


class PopularChannel:
    """Most popular items (recent interactions): the cold-start and fallback channel."""
    name = "popular"

    def __init__(self, ranked_items: np.ndarray, counts: np.ndarray) -> None:
        self.ranked_items = ranked_items.astype(np.int64)   # [n] best first
        # Score = log popularity, scaled to [0, 1] so it sits beside cosine scores.
        log_counts = np.log1p(counts[self.ranked_items].astype(np.float32))
        self.scores = log_counts / max(float(log_counts.max(initial=0.0)), 1e-6)

    def retrieve(self, want: int, exclude: set[int]) -> ChannelResult:
        head = self.ranked_items[:want + len(exclude)]
        if exclude:
            blocked = np.fromiter(exclude, np.int64, len(exclude))
            keep = np.flatnonzero(~np.isin(head, blocked))[:want]
        else:
            keep = np.arange(min(want, len(head)))
        return ChannelResult(self.ranked_items[keep], self.scores[keep])
