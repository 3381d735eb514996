"""LightGBM diversity re-ranker: builds the final slate greedily.

At each position it scores the remaining pool with features measured against the slate built so
far (max BERT similarity to placed items, count of the same category placed), subtracts
`diversity_weight` x max similarity, and places the best. The LightGBM model is boosted from the
fused score (its training init_score): a pool item's score is its fused logit plus the trees'
correction, so a model that learned nothing keeps the fused order instead of scrambling it. Only
the top `pool_size` candidates by fused score enter the pool: k LightGBM calls on 300 rows each
would cost ~10 ms, on 30 rows ~3 ms.

Explained (`rerank_explained`): the same slate and scores, plus per position the item's fused score,
the trees' correction and the diversity penalty it was placed with. A position's placement score is
fused + correction - penalty; the reported score is the running minimum of the placement scores
(non-increasing along the slate), so score <= fused + correction - penalty, equal unless an item
above it was placed lower. The plain `rerank` records nothing (one `is None` test per position).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.features import RERANK_FEATURES, rerank_features

POOL_SIZE = 30
FUSED_COLUMN = RERANK_FEATURES.index("fused_score")


def rerank_scores(booster, features: np.ndarray) -> np.ndarray:
    """Fused logit + the boosted correction (the model was trained with the fused logit as init_score)."""
    return features[:, FUSED_COLUMN] + booster.predict(features)


class SlatePool:
    """The re-ranker's pool and the slate-dependent features, updated as items are placed."""

    def __init__(self, items: np.ndarray, fused: np.ndarray, retrieval: np.ndarray,
                 item_text: np.ndarray, item_category: np.ndarray, item_side: np.ndarray,
                 pool_size: int = POOL_SIZE) -> None:
        top = np.argsort(-fused, kind="stable")[:pool_size]
        self.items = items[top]                                   # [M]
        self.fused = fused[top].astype(np.float32)
        self.rank_inv = (1.0 / np.log2(np.arange(len(top)) + 2.0)).astype(np.float32)
        self.retrieval = retrieval[top]
        self.vectors = item_text[self.items]                      # [M, D]
        self.category = item_category[self.items]
        self.side = item_side[self.items]                         # [M, 2] popularity, age
        self.max_sim = np.zeros(len(top), np.float32)
        self.same_category = np.zeros(len(top), np.float32)
        self.remaining = np.ones(len(top), bool)

    def features(self, position: int) -> np.ndarray:
        """[M, len(RERANK_FEATURES)] for every pool row (placed rows included, masked by caller)."""
        return rerank_features(self.fused, self.rank_inv, self.retrieval, self.side[:, 0],
                               self.side[:, 1], self.max_sim, self.same_category, position)

    def place(self, row: int) -> None:
        self.remaining[row] = False
        self.max_sim = np.maximum(self.max_sim, self.vectors @ self.vectors[row])
        self.same_category += (self.category == self.category[row]).astype(np.float32)


@dataclass(frozen=True)
class SlateExplanation:
    """Aligned with a slate [k]: what each position was placed with (float32 arrays).
    correction and penalty are None when the re-ranker did not build the slate (fused order)."""
    fused: np.ndarray
    correction: np.ndarray | None = None
    penalty: np.ndarray | None = None


class DiversityReranker:
    def __init__(self, booster, item_text: np.ndarray, item_category: np.ndarray,
                 item_side: np.ndarray, diversity_weight: float = 0.0, pool_size: int = POOL_SIZE) -> None:
        self.booster = booster          # lightgbm.Booster, threads set once at load
        self.item_text = item_text
        self.item_category = item_category
        self.item_side = item_side
        self.diversity_weight = diversity_weight
        self.pool_size = pool_size

    def rerank(self, items: np.ndarray, fused: np.ndarray, retrieval: np.ndarray, k: int,
               diversity_weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """items [N], fused [N], retrieval [N, F] -> (slate [<=k] int64, scores [<=k] float32)."""
        return self._build(items, fused, retrieval, k, diversity_weight, None)

    def rerank_explained(self, items: np.ndarray, fused: np.ndarray, retrieval: np.ndarray, k: int,
                         diversity_weight: float | None = None) -> tuple[np.ndarray, np.ndarray, SlateExplanation]:
        """As rerank, plus what each position was placed with: the same slate and scores."""
        placed: list[tuple[float, float, float]] = []
        slate, scores = self._build(items, fused, retrieval, k, diversity_weight, placed)
        columns = np.array(placed, np.float32).reshape(-1, 3)
        return slate, scores, SlateExplanation(columns[:, 0].copy(), columns[:, 1].copy(), columns[:, 2].copy())

    def _build(self, items: np.ndarray, fused: np.ndarray, retrieval: np.ndarray, k: int,
               diversity_weight: float | None, placed: list[tuple[float, float, float]] | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The greedy slate; `placed` (when not None) gets (fused, correction, penalty) per position."""
        weight = self.diversity_weight if diversity_weight is None else diversity_weight
        pool = SlatePool(items, fused, retrieval, self.item_text, self.item_category, self.item_side,
                         max(self.pool_size, k))
        slate: list[int] = []
        scores: list[float] = []
        for position in range(min(k, len(pool.items))):
            rows = np.flatnonzero(pool.remaining)
            raw = rerank_scores(self.booster, pool.features(position)[rows])
            adjusted = raw - weight * pool.max_sim[rows]
            best = int(np.argmax(adjusted))
            row = int(rows[best])
            if placed is not None:   # explain only: raw = fused + correction, adjusted = raw - penalty
                base = float(pool.fused[row])
                placed.append((base, float(raw[best]) - base, float(raw[best] - adjusted[best])))
            slate.append(int(pool.items[row]))
            scores.append(float(adjusted[best]))
            pool.place(row)
        # Placement scores can rise as the slate fills (features shift); callers read the score
        # as "better than what follows", so report it non-increasing along the slate.
        return np.array(slate, np.int64), np.minimum.accumulate(np.array(scores, np.float32))


class NoCorrection:
    """Stands in for the booster when the build found that the trees lower validation nDCG@10
    (manifest reranker.trees = false): every correction is 0, so the slate is the fused order
    with only the diversity step applied."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.zeros(len(features), np.float64)
