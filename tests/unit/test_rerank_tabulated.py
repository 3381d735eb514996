"""The slate builder's tabulated scoring (one LightGBM call per slate, core.rerank.DynamicSplits)
gives the same slate, scores and explanation as scoring position by position (k calls)."""
import lightgbm as lgb
import numpy as np
import pytest

import core.rerank as rerank
from core.features import RERANK_FEATURES, RETRIEVAL_FEATURES
from core.rerank import (MAX_SIM_COLUMN, POSITION_COLUMN, SAME_CATEGORY_COLUMN, DiversityReranker,
                         NoCorrection, dynamic_splits)

N_ITEMS, DIM, F = 400, 16, len(RETRIEVAL_FEATURES)


def _tables(rng):
    text = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return text, rng.integers(0, 5, N_ITEMS), rng.random((N_ITEMS, 2)).astype(np.float32)


def _booster(rng, zero_as_missing: bool, rounds: int = 12) -> lgb.Booster:
    """A model whose label leans on the slate columns (max_sim, same_category, position), so the
    trees split on them; zero_as_missing sends zeros their own (default) way."""
    x = rng.random((3000, len(RERANK_FEATURES))).astype(np.float32)
    x[:, SAME_CATEGORY_COLUMN] = rng.integers(0, 4, len(x))
    x[:, POSITION_COLUMN] = rng.integers(0, 10, len(x))
    x[rng.random(len(x)) < 0.3, MAX_SIM_COLUMN] = 0.0
    y = (x[:, MAX_SIM_COLUMN] - 0.3 * x[:, SAME_CATEGORY_COLUMN] + 0.1 * x[:, POSITION_COLUMN]
         + x[:, 0] + 0.1 * rng.standard_normal(len(x)))
    params = {"objective": "regression", "num_leaves": 8, "verbose": -1, "num_threads": 1,
              "zero_as_missing": zero_as_missing, "min_data_in_leaf": 5}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=rounds)


def _plain(reranker: DiversityReranker) -> DiversityReranker:
    """The same reranker scoring position by position."""
    plain = DiversityReranker(reranker.booster, reranker.item_text, reranker.item_category,
                              reranker.item_side, reranker.diversity_weight, reranker.pool_size)
    plain.splits = None
    return plain


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_tabulated_slate_equals_position_by_position(zero_as_missing, monkeypatch):
    monkeypatch.setattr(rerank, "MAX_TABULATED_ROWS", 10**6)      # this model's 490 cells: tabulate anyway
    monkeypatch.setattr(rerank, "MAX_CELLS_PER_POSITION", 10**6)
    tables = []
    tabulate = rerank.tabulated_scores
    monkeypatch.setattr(rerank, "tabulated_scores", lambda *a: tables.append(1) or tabulate(*a))
    rng = np.random.default_rng(7)
    text, category, side = _tables(rng)
    booster = _booster(rng, zero_as_missing)
    splits = dynamic_splits(booster)
    assert splits is not None and MAX_SIM_COLUMN in splits.columns   # the test exercises the table
    reranker = DiversityReranker(booster, text, category, side, diversity_weight=0.2)
    plain = _plain(reranker)
    for trial in range(25):
        n = int(rng.integers(5, 120))
        items = rng.choice(N_ITEMS, n, replace=False).astype(np.int64)
        fused = rng.standard_normal(n).astype(np.float32)
        retrieval = rng.random((n, F)).astype(np.float32)
        k = int(rng.integers(1, 20))
        fast = reranker.rerank_explained(items, fused, retrieval, k)
        slow = plain.rerank_explained(items, fused, retrieval, k)
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
        for a, b in zip((fast[2].fused, fast[2].correction, fast[2].penalty),
                        (slow[2].fused, slow[2].correction, slow[2].penalty)):
            np.testing.assert_array_equal(a, b)
    assert len(tables) >= 20   # the table scored (k = 1 slates score directly)


def test_no_correction_and_many_splits_score_position_by_position():
    rng = np.random.default_rng(3)
    text, category, side = _tables(rng)
    assert dynamic_splits(NoCorrection()) is None
    big = DiversityReranker(_booster(rng, False, rounds=200), text, category, side, 0.1)
    assert big.splits is not None and big.splits.cells > 1000   # too many cells: k calls instead
    plain = _plain(big)
    items = rng.choice(N_ITEMS, 60, replace=False).astype(np.int64)
    fused, retrieval = rng.standard_normal(60).astype(np.float32), rng.random((60, F)).astype(np.float32)
    for a, b in zip(big.rerank(items, fused, retrieval, 10), plain.rerank(items, fused, retrieval, 10)):
        np.testing.assert_array_equal(a, b)
