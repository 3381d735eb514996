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

Fresh slots (core.fresh, manifest "fresh.slots"): once the slate is built, its last positions may
go to the best candidates without training interactions; such a position is explained by its
served score alone (correction 0, penalty 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.features import RERANK_FEATURES, rerank_features
from core.fresh import FreshItems

POOL_SIZE = 30
FUSED_COLUMN = RERANK_FEATURES.index("fused_score")
# The slate-dependent columns: the only ones that change as items are placed.
MAX_SIM_COLUMN = RERANK_FEATURES.index("max_sim_to_slate")
SAME_CATEGORY_COLUMN = RERANK_FEATURES.index("same_category_in_slate")
POSITION_COLUMN = RERANK_FEATURES.index("position")


def rerank_scores(booster, features: np.ndarray) -> np.ndarray:
    """Fused logit + the boosted correction (the model was trained with the fused logit as init_score)."""
    return features[:, FUSED_COLUMN] + booster.predict(features)


# The trees' splits on the slate-dependent columns, tabulated once per model: a row's correction
# depends on those columns only through which side of each split threshold they fall, so scoring
# every pool row once per cell (one predict call) and looking the cell up per position gives the
# exact values k predict calls would (LightGBM scores rows independently). More cells than this
# (a model with many such splits) and the slate is scored position by position as before.
MAX_TABULATED_ROWS = 1024
MAX_CELLS_PER_POSITION = 2   # more cells than 2 x k positions: k calls are cheaper than the table
DYNAMIC_COLUMNS = (MAX_SIM_COLUMN, SAME_CATEGORY_COLUMN, POSITION_COLUMN)


@dataclass(frozen=True)
class DynamicSplits:
    """Per slate-dependent column the trees split on: the sorted distinct thresholds, and one
    float32 value per cell (cell i < len(t): t[i-1] < v <= t[i]; cell len(t): v > t[-1]; cell
    len(t) + 1: v == 0, its own cell since a split may send zero its default way). A representative
    that cannot be found (no float32 strictly inside, or one that reads as zero) is NaN: a value
    in that cell is scored the plain way."""
    columns: tuple[int, ...]
    thresholds: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]

    @property
    def cells(self) -> int:
        return int(np.prod([len(v) for v in self.values])) if self.values else 1

    def cell_of(self, matrix: np.ndarray) -> np.ndarray | None:
        """[M] combined cell index of each row; None when a row's value has no usable cell."""
        combined = np.zeros(len(matrix), np.int64)
        for column, t, values in zip(self.columns, self.thresholds, self.values):
            v = matrix[:, column].astype(np.float64)
            if not np.isfinite(v).all() or (np.abs(v[v != 0]) <= ZERO_THRESHOLD).any():
                return None   # NaN / inf or a value LightGBM reads as zero without being 0
            cell = np.where(v == 0, len(t) + 1, np.searchsorted(t, v, side="left"))
            if np.isnan(values[cell]).any():
                return None
            combined = combined * len(values) + cell
        return combined


ZERO_THRESHOLD = float(np.float32(1e-35))   # LightGBM's kZeroThreshold (a float): |v| <= it reads as zero


def _representatives(t: np.ndarray) -> np.ndarray:
    out = np.full(len(t) + 2, np.nan, np.float64)
    for i in range(len(t) + 1):
        if i < len(t):
            r = np.float32(t[i])
            if float(r) > t[i]:
                r = np.nextafter(r, np.float32(-np.inf))
            ok = i == 0 or float(r) > t[i - 1]
        else:
            r = np.float32(t[-1]) if len(t) else np.float32(1.0)
            if len(t) and float(r) <= t[-1]:
                r = np.nextafter(r, np.float32(np.inf))
            ok = True
        if ok and np.isfinite(r) and abs(float(r)) > ZERO_THRESHOLD:
            out[i] = float(r)
    out[len(t) + 1] = 0.0
    return out


def dynamic_splits(booster) -> DynamicSplits | None:
    """The booster's splits on the slate-dependent columns; None where tabulating does not apply
    (not a LightGBM booster, linear trees, a categorical split on such a column)."""
    try:
        model = booster.dump_model()
    except AttributeError:
        return None
    if any(t.get("is_linear") for t in model.get("tree_info", [])):
        return None
    found: dict[int, set[float]] = {c: set() for c in DYNAMIC_COLUMNS}
    stack = [t["tree_structure"] for t in model.get("tree_info", [])]
    while stack:
        node = stack.pop()
        if "split_feature" not in node:
            continue
        column = int(node["split_feature"])
        if column in found:
            if node.get("decision_type") != "<=":
                return None
            found[column].add(float(node["threshold"]))
        stack += [node["left_child"], node["right_child"]]
    used = [c for c in DYNAMIC_COLUMNS if found[c]]
    thresholds = tuple(np.array(sorted(found[c]), np.float64) for c in used)
    return DynamicSplits(tuple(used), thresholds, tuple(_representatives(t) for t in thresholds))


def tabulated_scores(booster, splits: DynamicSplits, matrix: np.ndarray) -> np.ndarray:
    """[cells, M]: rerank_scores of every row with its slate columns set to each cell's values."""
    cells, m = splits.cells, len(matrix)
    table = np.repeat(matrix[None], cells, axis=0)          # [cells, M, F]
    combo = np.arange(cells)
    for column, values in reversed(list(zip(splits.columns, splits.values))):
        table[:, :, column] = values[combo % len(values)].astype(np.float32)[:, None]
        combo = combo // len(values)
    flat = table.reshape(cells * m, matrix.shape[1])
    return rerank_scores(booster, flat).reshape(cells, m)


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
        self._matrix: np.ndarray | None = None   # current(): built once, slate columns updated in place

    def features(self, position: int) -> np.ndarray:
        """[M, len(RERANK_FEATURES)] for every pool row (placed rows included, masked by caller)."""
        return rerank_features(self.fused, self.rank_inv, self.retrieval, self.side[:, 0],
                               self.side[:, 1], self.max_sim, self.same_category, position)

    def current(self, position: int) -> np.ndarray:
        """The same values as features(position), in one matrix kept across positions: only the
        slate-dependent columns are rewritten (valid until the next call; do not keep it)."""
        if self._matrix is None:
            self._matrix = self.features(position)
        else:
            m = self._matrix
            m[:, MAX_SIM_COLUMN], m[:, SAME_CATEGORY_COLUMN], m[:, POSITION_COLUMN] = \
                self.max_sim, self.same_category, position
        return self._matrix

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
                 item_side: np.ndarray, diversity_weight: float = 0.0, pool_size: int = POOL_SIZE,
                 fresh: FreshItems = FreshItems()) -> None:
        self.booster = booster          # lightgbm.Booster, threads set once at load
        self.fresh = fresh              # slate positions kept for untrained items (core.fresh)
        self.item_text = item_text
        self.item_category = item_category
        self.item_side = item_side
        self.diversity_weight = diversity_weight
        self.pool_size = pool_size
        self.splits = dynamic_splits(booster)   # None: score position by position

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
        positions = min(k, len(pool.items))
        cells = self.splits.cells if self.splits is not None else 0
        splits = self.splits if 0 < cells and cells * len(pool.items) <= MAX_TABULATED_ROWS and \
            1 < positions and cells <= MAX_CELLS_PER_POSITION * positions else None
        table = None
        for position in range(positions):
            # Every pool row is scored (rows are scored independently: the remaining rows get the
            # values they would get alone) and placed rows are left out of the choice.
            matrix = pool.current(position)
            cell = splits.cell_of(matrix) if splits is not None else None
            if cell is not None:
                if table is None:
                    table = tabulated_scores(self.booster, splits, matrix)
                raw = table[cell, np.arange(len(cell))]
            else:
                raw = rerank_scores(self.booster, matrix)
            adjusted = raw - weight * pool.max_sim
            rows = np.flatnonzero(pool.remaining)
            row = int(rows[np.argmax(adjusted[rows])])
            if placed is not None:   # explain only: raw = fused + correction, adjusted = raw - penalty
                base = float(pool.fused[row])
                placed.append((base, float(raw[row]) - base, float(raw[row] - adjusted[row])))
            slate.append(int(pool.items[row]))
            scores.append(float(adjusted[row]))
            pool.place(row)
        # Placement scores can rise as the slate fills (features shift); callers read the score
        # as "better than what follows", so report it non-increasing along the slate.
        out, out_scores = np.array(slate, np.int64), np.minimum.accumulate(np.array(scores, np.float32))
        if self.fresh.slots:
            out, out_scores, given, rows = self.fresh.fill_slate(out, out_scores, items, fused, self.item_side[:, 0])
            if placed is not None:   # a fresh item is placed on its served score alone
                for position, row in zip(given.tolist(), rows.tolist()):
                    placed[position] = (float(fused[row]), 0.0, 0.0)
        return out, out_scores


class NoCorrection:
    """Stands in for the booster when the build found that the trees do not measurably raise validation nDCG@10
    (manifest reranker.trees = false): every correction is 0, so the slate is the fused order
    with only the diversity step applied."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.zeros(len(features), np.float64)
