"""Train the LightGBM LambdaRank re-ranker on candidate lists scored by the fused ranker.

Each list is replayed as the greedy slate would be built: at position p the slate so far is the
top-p of the pool by fused score, and every remaining pool item becomes a row of one query group
(label = relevant), with its diversity features measured against that prefix.
"""
from __future__ import annotations

import lightgbm as lgb
import numpy as np
from tqdm import tqdm

from core.features import RERANK_FEATURES
from offline.ranker import RankingList
from core.rerank import FUSED_COLUMN, SlatePool


def rerank_training_groups(lists: list[RankingList], fused: list[np.ndarray], item_text: np.ndarray,
                           item_category: np.ndarray, item_side: np.ndarray, positions: int = 10,
                           progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
    xs, ys, groups = [], [], []
    for lst, scores in tqdm(list(zip(lists, fused)), desc="reranker data", unit="list", disable=not progress):
        if not lst.labels.any():
            continue
        pool = SlatePool(lst.candidates, scores, lst.features, item_text, item_category, item_side)
        labels = dict(zip(lst.candidates.tolist(), lst.labels.tolist()))
        pool_labels = np.array([labels[int(i)] for i in pool.items], np.float32)
        for position in range(min(positions, len(pool.items) - 1)):
            rows = np.flatnonzero(pool.remaining)
            if pool_labels[rows].any():
                xs.append(pool.features(position)[rows])
                ys.append(pool_labels[rows])
                groups.append(len(rows))
            pool.place(int(rows[0]))   # prefix = fused order (rows are kept in fused order)
    if not xs:
        raise ValueError("no re-ranker training list has a relevant candidate")
    return np.concatenate(xs), np.concatenate(ys), groups


def train_reranker(x: np.ndarray, y: np.ndarray, groups: list[int], seed: int = 0, rounds: int = 80,
                   valid: tuple[np.ndarray, np.ndarray, list[int]] | None = None) -> lgb.Booster:
    """LambdaRank boosted from the fused score (init_score): the trees learn corrections to the fused
    order. With `valid` groups, stops at the round with the best validation nDCG@10."""
    # Few, shallow-ish trees: serving calls the model k times per request on the greedy slate,
    # and its cost grows with rows x trees.
    params = {"objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [10],
              "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50,
              "feature_fraction": 0.9, "num_threads": 2, "seed": seed, "verbose": -1,
              "deterministic": True}

    def dataset(x, y, groups):
        return lgb.Dataset(x, y, group=groups, init_score=x[:, FUSED_COLUMN], feature_name=list(RERANK_FEATURES))

    train = dataset(x, y, groups)
    if valid is None:
        return lgb.train(params, train, num_boost_round=rounds)
    return lgb.train(params, train, num_boost_round=rounds, valid_sets=[dataset(*valid)],
                     callbacks=[lgb.early_stopping(10, verbose=False)])
